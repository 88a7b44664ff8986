package fakesnp

import "github.com/google/go-sev-guest/kds"

func kdsTCB(v uint64) kds.TCBVersion { return kds.TCBVersion(v) }
