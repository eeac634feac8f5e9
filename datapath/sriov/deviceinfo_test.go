package sriov_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/weftnet/weft/datapath/sriov"
)

func TestDeviceInfoRoundTrip(t *testing.T) {
	d := sriov.DeviceInfoFiles{Dir: filepath.Join(t.TempDir(), "devinfo", "cni")}
	path, err := d.Write("fast", "c0ffee", "net1", "0000:03:02.3", "")
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(d.Dir, "fast-c0ffee-net1-device.json"); path != want {
		t.Fatalf("path %s, want %s", path, want)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// The exact document of the spec's example, so a DPDK app's parser reads it.
	if want := `{"type":"pci","version":"1.1.0","pci":{"pci-address":"0000:03:02.3"}}`; string(b) != want {
		t.Fatalf("file holds %s\nwant %s", b, want)
	}
	di, err := d.Read("fast", "c0ffee", "net1")
	if err != nil || di.PCI.PCIAddress != "0000:03:02.3" || di.Version != "1.1.0" || di.Type != "pci" {
		t.Fatalf("Read = %+v, %v", di, err)
	}
	// Writing again replaces the file.
	if _, err := d.Write("fast", "c0ffee", "net1", "0000:03:02.4", "0000:03:00.0"); err != nil {
		t.Fatal(err)
	}
	if di, err = d.Read("fast", "c0ffee", "net1"); err != nil || di.PCI.PCIAddress != "0000:03:02.4" || di.PCI.PFPCIAddress != "0000:03:00.0" {
		t.Fatalf("Read after rewrite = %+v, %v", di, err)
	}
	if err := d.Remove("fast", "c0ffee", "net1"); err != nil {
		t.Fatal(err)
	}
	if err := d.Remove("fast", "c0ffee", "net1"); err != nil {
		t.Fatalf("second Remove: %v", err)
	}
	if _, err := d.Read("fast", "c0ffee", "net1"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Read after Remove: %v, want not exist", err)
	}
	if entries, _ := os.ReadDir(d.Dir); len(entries) != 0 {
		t.Fatalf("%d files left behind (temporaries?)", len(entries))
	}
}

func TestDeviceInfoNamespacedNetwork(t *testing.T) {
	d := sriov.DeviceInfoFiles{Dir: t.TempDir()}
	path, err := d.Write("ns1/fast", "c1", "net1", "0000:03:02.0", "")
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(path) != d.Dir || filepath.Base(path) != "ns1-fast-c1-net1-device.json" {
		t.Fatalf("path %s escapes %s or is misnamed", path, d.Dir)
	}
}

func TestDeviceInfoBadInput(t *testing.T) {
	d := sriov.DeviceInfoFiles{Dir: t.TempDir()}
	cases := []struct{ net, ctr, ifn, pci, pf string }{
		{"", "c", "net1", "0000:03:02.0", ""},
		{"fast", "", "net1", "0000:03:02.0", ""},
		{"fast", "c", "", "0000:03:02.0", ""},
		{"fast", "c", "net1", "03:02.0", ""},
		{"fast", "c", "net1", "0000:03:02.0\n", ""},
		{"fast", "c", "net1", "0000:03:02.0", "garbage"},
		{"..", "c", "net1", "0000:03:02.0", ""},
		{"fast", strings.Repeat("c", 300), "net1", "0000:03:02.0", ""},
	}
	for _, c := range cases {
		if p, err := d.Write(c.net, c.ctr, c.ifn, c.pci, c.pf); !errors.Is(err, sriov.ErrDeviceInfo) {
			t.Errorf("Write(%q,%q,%q,%q,%q) = %s, %v; want ErrDeviceInfo", c.net, c.ctr, c.ifn, c.pci, c.pf, p, err)
		}
	}
	if entries, _ := os.ReadDir(d.Dir); len(entries) != 0 {
		t.Fatalf("bad input left %d files", len(entries))
	}
	// A file that is not a pci device info is refused on read.
	p, _ := d.Path("fast", "c", "net1")
	if err := os.WriteFile(p, []byte(`{"type":"vdpa","version":"1.1.0"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Read("fast", "c", "net1"); !errors.Is(err, sriov.ErrDeviceInfo) {
		t.Fatalf("Read of a non-pci file: %v", err)
	}
}

// A reader racing rewrites sees a whole document every time, never a partial or missing one.
func TestDeviceInfoAtomicRewrite(t *testing.T) {
	d := sriov.DeviceInfoFiles{Dir: t.TempDir()}
	path, err := d.Write("fast", "c", "net1", "0000:03:02.0", "")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	var writes int
	go func() {
		defer wg.Done()
		addrs := []string{"0000:03:02.1", "0000:03:02.2"}
		for ctx.Err() == nil {
			if _, err := d.Write("fast", "c", "net1", addrs[writes%2], ""); err != nil {
				t.Errorf("write: %v", err)
				return
			}
			writes++
		}
	}()
	reads := 0
	for ctx.Err() == nil {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("read %d: %v", reads, err)
		}
		var di sriov.DeviceInfo
		if err := json.Unmarshal(b, &di); err != nil || di.PCI == nil {
			t.Fatalf("read %d saw a partial document %q: %v", reads, b, err)
		}
		reads++
	}
	wg.Wait()
	if writes < 10 || reads < 10 {
		t.Fatalf("only %d writes and %d reads raced", writes, reads)
	}
	t.Logf("%d rewrites, %d whole reads", writes, reads)
}
