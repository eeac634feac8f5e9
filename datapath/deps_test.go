package datapath_test

import (
	"os/exec"
	"strings"
	"testing"
)

// The link drivers stand side by side: what they share lives in package datapath, and no
// driver imports another (nor does a driver's test import another driver).
func TestDriversImportNoOtherDriver(t *testing.T) {
	const base = "github.com/weftnet/weft/datapath/"
	drivers := []string{"direct", "vxlan", "wireguard"}
	for _, d := range drivers {
		out, err := exec.Command("go", "list", "-deps", "-test", base+d).CombinedOutput()
		if err != nil {
			t.Fatalf("go list -deps %s: %v: %s", d, err, out)
		}
		deps := strings.Fields(string(out))
		if len(deps) < 2 {
			t.Fatalf("go list -deps %s listed nothing: %q", d, out)
		}
		for _, dep := range deps {
			for _, other := range drivers {
				if other != d && (dep == base+other || strings.HasPrefix(dep, base+other+"/")) {
					t.Errorf("driver %s depends on driver %s (%s)", d, other, dep)
				}
			}
		}
	}
}
