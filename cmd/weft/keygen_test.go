package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/weftnet/weft/router"
)

func runWeft(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestKeygenWritesAPrivateKeyFileOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cluster.key")
	if _, err := runWeft(t, "keygen", "-o", path); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %o, want 600", st.Mode().Perm())
	}
	first, _ := os.ReadFile(path)
	if bytes.Count(first, []byte("\n")) != 1 {
		t.Errorf("key file %q is not one line", first)
	}
	key, err := clusterKeyFrom(path, "", "", false)
	if err != nil || len(key) != router.ClusterKeySize {
		t.Fatalf("reading the key back: %d bytes, %v", len(key), err)
	}

	// An existing key is never overwritten by accident.
	if _, err := runWeft(t, "keygen", "-o", path); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("keygen over an existing file: %v, want a refusal naming --force", err)
	}
	if again, _ := os.ReadFile(path); !bytes.Equal(again, first) {
		t.Fatal("the refused keygen changed the file")
	}
	// --force overwrites, and makes a loose file private again.
	os.Chmod(path, 0o644)
	if _, err := runWeft(t, "keygen", "-o", path, "--force"); err != nil {
		t.Fatal(err)
	}
	second, _ := os.ReadFile(path)
	if bytes.Equal(second, first) {
		t.Error("--force kept the old key")
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Errorf("after --force the mode is %o, want 600", st.Mode().Perm())
	}

	// Without -o the key goes to stdout; two keys differ.
	out, err := runWeft(t, "keygen")
	if err != nil {
		t.Fatal(err)
	}
	if k, err := parseClusterKey([]byte(out)); err != nil || bytes.Equal([]byte(out), second) {
		t.Fatalf("stdout key %q: %v", out, err)
	} else if len(k) != router.ClusterKeySize {
		t.Fatalf("stdout key has %d bytes", len(k))
	}
}

func TestClusterKeyFlags(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
		return p
	}
	good := write("good.key", string(encodeClusterKey(bytes.Repeat([]byte{7}, 32))), 0o600)
	loose := write("loose.key", string(encodeClusterKey(bytes.Repeat([]byte{7}, 32))), 0o640)
	short := write("short.key", "c2hvcnQ=\n", 0o600)
	garbage := write("garbage.key", "not base64 at all!\n", 0o600)
	pass := write("pass", "correct horse battery staple\n", 0o600)
	empty := write("empty", "\n", 0o600)

	for _, tc := range []struct {
		name                     string
		keyFile, passFile, clust string
		insecure                 bool
		want                     string // error substring; "" = success
	}{
		{"key", good, "", "weft", false, ""},
		{"insecure", "", "", "weft", true, ""},
		{"passphrase", "", pass, "weft", false, ""},
		{"nothing", "", "", "weft", false, "weft keygen -o"},
		{"insecure and key", good, "", "weft", true, "--insecure together"},
		{"insecure and passphrase", "", pass, "weft", true, "--insecure together"},
		{"both files", good, pass, "weft", false, "both set"},
		{"loose mode", loose, "", "weft", false, "chmod 600 " + loose},
		{"short key", short, "", "weft", false, "holds 5 bytes, want 32"},
		{"garbage key", garbage, "", "weft", false, "not a weft key"},
		{"missing", filepath.Join(dir, "nope"), "", "weft", false, "no such file"},
		{"empty passphrase", "", empty, "weft", false, "is empty"},
		{"no cluster name", "", pass, "", false, "--cluster-name"},
	} {
		key, err := clusterKeyFrom(tc.keyFile, tc.passFile, tc.clust, tc.insecure)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want == "" && tc.insecure && key != nil:
			t.Errorf("%s: a key with --insecure", tc.name)
		case tc.want == "" && !tc.insecure && len(key) != router.ClusterKeySize:
			t.Errorf("%s: key of %d bytes", tc.name, len(key))
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}

	// The passphrase is stretched, salted by the cluster name, and its trailing newline is
	// not part of it.
	a := keyFromPassphrase([]byte("correct horse battery staple"), "weft")
	b, _ := clusterKeyFrom("", pass, "weft", false)
	c, _ := clusterKeyFrom("", pass, "prod", false)
	if !bytes.Equal(a, b) || bytes.Equal(b, c) {
		t.Errorf("passphrase keys: same name equal %v, other name differs %v", bytes.Equal(a, b), !bytes.Equal(b, c))
	}
}

func TestPeerRefusesToStartWithoutAKey(t *testing.T) {
	_, err := runWeft(t, "peer", "--name", "x", "--data-dir", t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "weft keygen -o") || !strings.Contains(err.Error(), "--key-file") {
		t.Fatalf("peer without a key: %v, want the way to make one", err)
	}
}

// BenchmarkKeyFromPassphrase is what a peer pays once at start, and a guesser per guess.
func BenchmarkKeyFromPassphrase(b *testing.B) {
	for b.Loop() {
		keyFromPassphrase([]byte("correct horse battery staple"), "weft")
	}
}
