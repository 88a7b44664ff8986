package firmware

import (
	"bytes"
	"crypto"
	"encoding/binary"
	"unicode/utf16"

	"github.com/svsm-e2e/svsm-e2e/svsm/uefivars"
)

// TCG PC Client event types used here (TCG PC Client PFP 1.05, §10.4.1).
const (
	EvPostCode                     = 0x00000001
	EvNoAction                     = 0x00000003
	EvSeparator                    = 0x00000004
	EvSCRTMVersion                 = 0x00000008
	EvIPL                          = 0x0000000D
	EvEFIVariableDriverConfig      = 0x80000001
	EvEFIBootServicesApplication   = 0x80000003
	EvEFIPlatformFirmwareBlob      = 0x80000008
	tpmAlgSHA1, tpmAlgSHA256       = 0x0004, 0x000B
	tpmAlgSHA384, tpmAlgSHA512     = 0x000C, 0x000D
	specIDSignature                = "Spec ID Event03\x00"
	specIDUintnSize64              = 2
	specIDPlatformClassClient      = 0
	specIDVersionMajor, specErrata = 2, 0
)

// Bank is one PCR bank the TPM has allocated.
type Bank struct {
	Alg  uint16 // TPM_ALG_ID
	Hash crypto.Hash
}

// EventLog is a TCG crypto-agile event log under construction: the Spec ID event in the
// SHA-1 format, then TCG_PCR_EVENT2 records with a digest for every bank.
type EventLog struct {
	banks []Bank
	buf   bytes.Buffer
}

func newEventLog(banks []Bank) *EventLog {
	l := &EventLog{banks: banks}
	var spec bytes.Buffer
	spec.WriteString(specIDSignature)
	le := func(v any) { _ = binary.Write(&spec, binary.LittleEndian, v) }
	le(uint32(specIDPlatformClassClient))
	le(uint8(0)) // specVersionMinor
	le(uint8(specIDVersionMajor))
	le(uint8(specErrata))
	le(uint8(specIDUintnSize64))
	le(uint32(len(banks)))
	for _, b := range banks {
		le(b.Alg)
		le(uint16(b.Hash.Size()))
	}
	le(uint8(0)) // vendorInfoSize
	w := func(v any) { _ = binary.Write(&l.buf, binary.LittleEndian, v) }
	w(uint32(0))
	w(uint32(EvNoAction))
	l.buf.Write(make([]byte, 20))
	w(uint32(spec.Len()))
	l.buf.Write(spec.Bytes())
	return l
}

// add appends an event whose digests are given per bank (in l.banks order).
func (l *EventLog) add(pcr int, typ uint32, digests [][]byte, data []byte) {
	w := func(v any) { _ = binary.Write(&l.buf, binary.LittleEndian, v) }
	w(uint32(pcr))
	w(typ)
	w(uint32(len(l.banks)))
	for i, b := range l.banks {
		w(b.Alg)
		l.buf.Write(digests[i])
	}
	w(uint32(len(data)))
	l.buf.Write(data)
}

// Bytes returns the binary log.
func (l *EventLog) Bytes() []byte { return bytes.Clone(l.buf.Bytes()) }

// uefiVariableData is UEFI_VARIABLE_DATA, the event data of EV_EFI_VARIABLE_DRIVER_CONFIG.
func uefiVariableData(guid uefivars.GUID, name string, data []byte) []byte {
	var b bytes.Buffer
	b.Write(guid[:])
	u := utf16.Encode([]rune(name))
	_ = binary.Write(&b, binary.LittleEndian, uint64(len(u)))
	_ = binary.Write(&b, binary.LittleEndian, uint64(len(data)))
	_ = binary.Write(&b, binary.LittleEndian, u)
	b.Write(data)
	return b.Bytes()
}

// imageLoadEvent is UEFI_IMAGE_LOAD_EVENT with an empty device path.
func imageLoadEvent(size int) []byte {
	var b bytes.Buffer
	for _, v := range []uint64{0, uint64(size), 0, 0} {
		_ = binary.Write(&b, binary.LittleEndian, v)
	}
	return b.Bytes()
}
