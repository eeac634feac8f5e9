package main

import (
	"fmt"
	"os"

	"bytes"
	"github.com/spf13/pflag"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/router"
)

func TestFlagsFromEnvPrecedence(t *testing.T) {
	t.Setenv("WEFT_SOCKET", "/env/weft.sock")
	t.Setenv("WEFT_IPALLOC_RANGE", "10.50.0.0/16")
	root := newRootCmd()
	peer, _, err := root.Find([]string{"peer"})
	if err != nil {
		t.Fatal(err)
	}
	if err := peer.ParseFlags([]string{"--socket", "/flag/weft.sock"}); err != nil {
		t.Fatal(err)
	}
	if err := flagsFromEnv(peer.Flags()); err != nil {
		t.Fatal(err)
	}
	if got, _ := peer.Flags().GetString("socket"); got != "/flag/weft.sock" {
		t.Errorf("--socket = %q: the command line must beat WEFT_SOCKET", got)
	}
	if got, _ := peer.Flags().GetString("ipalloc-range"); got != "10.50.0.0/16" {
		t.Errorf("--ipalloc-range = %q: WEFT_IPALLOC_RANGE must beat the default", got)
	}
}

func TestBadEnvValueNamesTheVariable(t *testing.T) {
	t.Setenv("WEFT_MTU", "lots")
	root := newRootCmd()
	root.SetArgs([]string{"peer", "--name", "x"})
	err := root.Execute()
	if err == nil || !strings.Contains(err.Error(), "WEFT_MTU") {
		t.Fatalf("err = %v, want one naming WEFT_MTU", err)
	}
}

func TestEveryFlagHasItsEnvName(t *testing.T) {
	if envName("ipalloc-range") != "WEFT_IPALLOC_RANGE" || envName("socket") != "WEFT_SOCKET" {
		t.Fatal("env names do not follow --some-flag → WEFT_SOME_FLAG")
	}
}

func TestPrintStatus(t *testing.T) {
	var out bytes.Buffer
	st := router.Status{Name: "p1", Version: "v", Uptime: "1s", DataDir: "/d",
		Attachments: []router.AttachmentStatus{{Name: "web", ContainerID: "0123456789abcdef", IfName: "eth0"}},
		Started:     time.Now()}
	printStatus(&out, st)
	for _, want := range []string{"peer p1", "NETWORK", "web", "0123456789ab", "eth0"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status output lacks %q:\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), "0123456789abcdef") {
		t.Errorf("container IDs should be shortened:\n%s", out.String())
	}
}

// TestReadmeDocumentsEveryPeerFlag keeps the README's table of `weft peer` flags complete:
// every flag with its environment variable.
func TestReadmeDocumentsEveryPeerFlag(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	peer, _, err := newRootCmd().Find([]string{"peer"})
	if err != nil {
		t.Fatal(err)
	}
	peer.Flags().VisitAll(func(f *pflag.Flag) {
		row := fmt.Sprintf("| `--%s` | `%s` |", f.Name, envName(f.Name))
		if f.Name != "help" && !bytes.Contains(readme, []byte(row)) {
			t.Errorf("README has no row starting %q", row)
		}
	})
}
