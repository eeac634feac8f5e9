package lab

import (
	"errors"
	"os"

	"github.com/weftnet/weft/datapath/nslab"
)

// listNetNS returns the names of the named namespaces that belong to a lab with prefix:
// "<prefix>-ul" and "<prefix>-h…" (namespaces are made with nslab.CreateNetNS).
func listNetNS(prefix string) ([]string, error) {
	ents, err := os.ReadDir(nslab.NetNSDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range ents {
		n := e.Name()
		if n == prefix+"-ul" || hasHostPrefix(n, prefix) {
			names = append(names, n)
		}
	}
	return names, nil
}

// hasHostPrefix reports whether n is "<prefix>-h<digit>…".
func hasHostPrefix(n, prefix string) bool {
	p := prefix + "-h"
	return len(n) > len(p) && n[:len(p)] == p && n[len(p)] >= '0' && n[len(p)] <= '9'
}
