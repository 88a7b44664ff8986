package fakesnp

import "encoding/asn1"

func asn1Marshal(v any) ([]byte, error) { return asn1.Marshal(v) }

func asn1MarshalIA5(s string) ([]byte, error) { return asn1.MarshalWithParams(s, "ia5") }
