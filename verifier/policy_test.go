package verifier

import (
	"testing"

	"github.com/google/go-sev-guest/kds"
)

// TestPolicyInputsEqual: a change to any field checkPolicy reads makes the inputs differ (so
// the release checks the evidence again); the copy does not follow later changes to the
// record.
func TestPolicyInputsEqual(t *testing.T) {
	base := func() *VM {
		return &VM{VMSpec: VMSpec{Name: "vm", Measurements: []HexBytes{{1}, {2}}, HostData: HexBytes{3}, ChipIDs: []HexBytes{{4}},
			MinTCB: &kds.TCBParts{BlSpl: 1, TeeSpl: 2, SnpSpl: 3, UcodeSpl: 4}, SecretMode: "v1"}}
	}
	orig := policyOf(base())
	if !orig.equal(policyOf(base())) {
		t.Fatal("identical records differ")
	}
	for _, tc := range []struct {
		name   string
		change func(*VM)
		same   bool
	}{
		{"name", func(v *VM) { v.Name = "other" }, false},
		{"measurement withdrawn", func(v *VM) { v.Measurements = v.Measurements[:1] }, false},
		{"measurement replaced", func(v *VM) { v.Measurements[1] = HexBytes{9} }, false},
		{"measurement changed in place", func(v *VM) { v.Measurements[1][0] = 9 }, false},
		{"measurements reordered", func(v *VM) { v.Measurements[0], v.Measurements[1] = v.Measurements[1], v.Measurements[0] }, false},
		{"host data", func(v *VM) { v.HostData = HexBytes{8} }, false},
		{"host data unpinned", func(v *VM) { v.HostData = nil }, false},
		{"chip pinned", func(v *VM) { v.ChipIDs = append(v.ChipIDs, HexBytes{5}) }, false},
		{"chip replaced", func(v *VM) { v.ChipIDs[0] = HexBytes{6} }, false},
		{"debug allowed", func(v *VM) { v.AllowDebug = true }, false},
		{"migration agent allowed", func(v *VM) { v.AllowMigrateMA = true }, false},
		{"minimum TCB raised", func(v *VM) { v.MinTCB.SnpSpl = 9 }, false},
		{"minimum TCB dropped", func(v *VM) { v.MinTCB = nil }, false},
		// Fields checkPolicy does not read leave the inputs as they were.
		{"secret mode", func(v *VM) { v.SecretMode = "raw" }, true},
		{"write-through", func(v *VM) { v.WriteThrough = true }, true},
		{"counter", func(v *VM) { v.Counter = 7 }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vm := base()
			before := policyOf(vm)
			tc.change(vm)
			if got := policyOf(vm).equal(orig); got != tc.same {
				t.Errorf("equal after the change = %v, want %v", got, tc.same)
			}
			if !before.equal(orig) {
				t.Error("the copy taken before the change followed it")
			}
		})
	}
}
