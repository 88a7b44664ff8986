package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// SNP guest-request frames (PROTOCOLS.md §4): the SNP ABI MSG_REPORT_REQ / MSG_REPORT_RSP
// bodies, sent unencrypted and length-prefixed between guest and fakesnp.
const (
	ReportReqSize = 0x60
	ReportRspSize = 0x20 + ReportSize // 1216

	// SNP firmware status codes we produce.
	StatusSuccess       = 0x00
	StatusInvalidParams = 0x16
)

// ReportRequest is MSG_REPORT_REQ.
type ReportRequest struct {
	ReportData  [64]byte
	VMPL        uint32
	KeySelector uint32 // bits 1:0; 0 = default (VCEK)
}

// MarshalBinary encodes the 96-byte request.
func (r *ReportRequest) MarshalBinary() ([]byte, error) {
	b := make([]byte, ReportReqSize)
	copy(b[0:64], r.ReportData[:])
	binary.LittleEndian.PutUint32(b[0x40:], r.VMPL)
	binary.LittleEndian.PutUint32(b[0x44:], r.KeySelector)
	return b, nil
}

// UnmarshalBinary decodes a request, refusing any size but 96 and non-zero reserved bytes.
func (r *ReportRequest) UnmarshalBinary(b []byte) error {
	if len(b) != ReportReqSize {
		return fmt.Errorf("MSG_REPORT_REQ: %d bytes, want %d", len(b), ReportReqSize)
	}
	for _, x := range b[0x48:] {
		if x != 0 {
			return errors.New("MSG_REPORT_REQ: reserved bytes not zero")
		}
	}
	copy(r.ReportData[:], b[0:64])
	r.VMPL = binary.LittleEndian.Uint32(b[0x40:])
	r.KeySelector = binary.LittleEndian.Uint32(b[0x44:])
	if r.KeySelector&^3 != 0 {
		return fmt.Errorf("MSG_REPORT_REQ: key selector %#x has reserved bits", r.KeySelector)
	}
	return nil
}

// ReportResponse is MSG_REPORT_RSP. Report is nil unless Status is success.
type ReportResponse struct {
	Status uint32
	Report []byte
}

// MarshalBinary encodes the 1216-byte response.
func (r *ReportResponse) MarshalBinary() ([]byte, error) {
	b := make([]byte, ReportRspSize)
	binary.LittleEndian.PutUint32(b[0:], r.Status)
	if r.Status == StatusSuccess {
		if len(r.Report) != ReportSize {
			return nil, fmt.Errorf("MSG_REPORT_RSP: report is %d bytes, want %d", len(r.Report), ReportSize)
		}
		binary.LittleEndian.PutUint32(b[4:], ReportSize)
		copy(b[0x20:], r.Report)
	}
	return b, nil
}

// UnmarshalBinary decodes a response.
func (r *ReportResponse) UnmarshalBinary(b []byte) error {
	if len(b) != ReportRspSize {
		return fmt.Errorf("MSG_REPORT_RSP: %d bytes, want %d", len(b), ReportRspSize)
	}
	r.Status = binary.LittleEndian.Uint32(b[0:])
	size := binary.LittleEndian.Uint32(b[4:])
	if r.Status != StatusSuccess {
		r.Report = nil
		return nil
	}
	if size != ReportSize {
		return fmt.Errorf("MSG_REPORT_RSP: report size %d, want %d", size, ReportSize)
	}
	r.Report = append([]byte(nil), b[0x20:]...)
	return nil
}
