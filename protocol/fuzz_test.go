package protocol

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"testing"
)

func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{2, 0, 0, 0, 0, 0, 0, 0, '{', '}'})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		for {
			body, err := ReadFrame(r, 4096)
			if err != nil {
				return
			}
			if len(body) > 4096 {
				t.Fatalf("frame of %d bytes beyond limit", len(body))
			}
		}
	})
}

func FuzzDecodeNegotiationRequest(f *testing.F) {
	f.Add([]byte(`{"version":[0,1,0],"tee":"snp"}`))
	f.Add([]byte(`{"version":[0,2,0],"tee":"snp","confirm":{"boot_id":"AAAAAAAAAAAAAAAAAAAAAA==","counter":1,"mac":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}`))
	f.Add([]byte(`{"version":[0,3,0],"tee":"snp","confirm":{"boot_id":"AAAAAAAAAAAAAAAAAAAAAA==","counter":1,"nonce":"AAAAAAAAAAAAAAAAAAAAAA==","mac":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeNegotiationRequest(b)
		if err == nil && m.Version != VersionAttest && m.Version != VersionConfirm {
			t.Fatalf("accepted version %v", m.Version)
		}
	})
}

func FuzzDecodeNegotiationResponse(f *testing.F) {
	f.Add([]byte(`{"challenge":"+/8=","params":["EcPublicKeyBytes","Challenge"]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeNegotiationResponse(b)
		if err == nil && (len(m.Challenge) == 0 || len(m.Challenge) > NonceMaxSize) {
			t.Fatal("unbounded challenge accepted")
		}
	})
}

func FuzzDecodeAttestationRequest(f *testing.F) {
	f.Add([]byte(`{"tee":"snp","evidence":{"Snp":{"report":""}},"challenge":"AA==","key":{"x":"","y":""}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeAttestationRequest(b)
		if err == nil && (len(m.Evidence.Snp.Report) != ReportSize || m.Key.Validate() != nil) {
			t.Fatal("invalid request accepted")
		}
	})
}

func FuzzDecodeAttestationResponse(f *testing.F) {
	f.Add([]byte(`{"success":false,"decryption":null,"token":null}`))
	f.Add([]byte(`{"success":false,"secret":null,"decryption":null,"token":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeAttestationResponse(b)
		if err == nil && m.Success && (len(m.Secret) == 0 || m.Decryption == nil) {
			t.Fatal("inconsistent success accepted")
		}
		if err == nil {
			if _, err := json.Marshal(m); err != nil {
				t.Fatalf("accepted message does not re-encode: %v", err)
			}
		}
	})
}

func FuzzDecryptionFromJWE(f *testing.F) {
	f.Add([]byte(`{"protected":"e30","encrypted_key":"","iv":"","ciphertext":"","tag":""}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var j FlattenedJWE
		if json.Unmarshal(b, &j) != nil {
			return
		}
		d, ct, err := DecryptionFromJWE(&j)
		if err == nil && (d.EPK.Validate() != nil || len(ct) > MaxSecretSize) {
			t.Fatal("invalid JWE accepted")
		}
	})
}

func FuzzSecretPayloadV1(f *testing.F) {
	p := SecretPayloadV1{ExpectedCounter: 1, NextCounter: 2}
	b, _ := p.MarshalBinary()
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		var p SecretPayloadV1
		if p.UnmarshalBinary(b) != nil {
			return
		}
		out, _ := p.MarshalBinary()
		if !bytes.Equal(out, b) {
			t.Fatal("decode/encode not canonical")
		}
	})
}

func FuzzReportMessages(f *testing.F) {
	f.Add(make([]byte, ReportReqSize))
	f.Add(make([]byte, ReportRspSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		var req ReportRequest
		_ = req.UnmarshalBinary(b)
		var rsp ReportResponse
		if rsp.UnmarshalBinary(b) == nil && rsp.Status == StatusSuccess && len(rsp.Report) != ReportSize {
			t.Fatal("bad report size accepted")
		}
	})
}

// FuzzConfirmAnswer: whatever the host sends as a confirmation answer, only the verifier's
// authenticated answer to this very request verifies.
func FuzzConfirmAnswer(f *testing.F) {
	keys, _ := DeriveConfirmKeys(bytes.Repeat([]byte{7}, 32))
	req := NewConfirmRequest(keys, bytes.Repeat([]byte{1}, BootIDSize), 3, bytes.Repeat([]byte{2}, ConfirmNonceSize))
	good, _ := json.Marshal(NewConfirmAnswer(keys, req, true, 3, ""))
	f.Add(good)
	f.Add([]byte(`{"success":true,"counter":3}`))
	f.Add([]byte(`{"version":[0,3,0],"success":true,"boot_id":"AQEBAQEBAQEBAQEBAQEBAQ==","counter":3,"nonce":"AgICAgICAgICAgICAgICAg==","confirmed":3,"mac":"` + b64(req.MAC) + `"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeConfirmResponse(b)
		if err != nil {
			return
		}
		if r.VerifyAnswer(keys, req) == nil {
			want := NewConfirmAnswer(keys, req, r.Success, r.Confirmed, r.Reason)
			if !bytes.Equal(want.MAC, r.MAC) {
				t.Fatalf("an answer verified without the verifier's MAC: %s", b)
			}
		}
	})
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func FuzzKBSTypesAAD(f *testing.F) {
	f.Add(base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"a","enc":"b","epk":{"y":1,"x":[2,{"b":1,"a":2}]}}`)))
	f.Fuzz(func(t *testing.T, s string) {
		aad, err := KBSTypesAAD(s)
		if err != nil {
			return
		}
		// A rebuilt header is a fixed point: rebuilding it again changes nothing.
		again, err := KBSTypesAAD(string(aad))
		if err != nil || !bytes.Equal(again, aad) {
			t.Fatalf("rebuild of %q not stable: %q %v", aad, again, err)
		}
	})
}
