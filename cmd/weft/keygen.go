package main

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/crypto/argon2"

	"github.com/weftnet/weft/router"
)

// A cluster key file holds the router.ClusterKeySize key bytes in standard base64 on one
// line, so that it can be pasted into a secret store and back.

// argon2id parameters of a passphrase (RFC 9106's second recommended set: 3 passes over
// 64 MiB). Every peer pays this once at start; a guesser pays it per guess.
const (
	passphraseTime    = 3
	passphraseMemory  = 64 << 10 // KiB
	passphraseThreads = 4
	// passphraseSaltPrefix plus the cluster name is the salt, so that one guess does not
	// serve every weft cluster with the same passphrase.
	passphraseSaltPrefix = "weft cluster key v1\x00"
)

func newKeygenCmd() *cobra.Command {
	var out string
	var force bool
	cmd := &cobra.Command{
		Use:   "keygen [-o FILE]",
		Short: "Make a new random cluster key (on stdout, or in FILE with mode 0600)",
		Long: "keygen makes a random 32-byte cluster key, base64 on one line. Copy the same file to every\n" +
			"host (mode 0600) and start each peer with `weft peer --key-file FILE`.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			key := make([]byte, router.ClusterKeySize)
			if _, err := rand.Read(key); err != nil {
				return fmt.Errorf("read random bytes: %w", err)
			}
			text := encodeClusterKey(key)
			if out == "" {
				_, err := cmd.OutOrStdout().Write(text)
				return err
			}
			return writeKeyFile(out, text, force)
		},
	}
	cmd.Flags().StringVarP(&out, "output", "o", "", "write the key to this file (mode 0600) instead of stdout")
	cmd.Flags().BoolVar(&force, "force", false, "overwrite FILE if it exists")
	return cmd
}

func encodeClusterKey(key []byte) []byte {
	return append([]byte(base64.StdEncoding.EncodeToString(key)), '\n')
}

// writeKeyFile creates path with mode 0600 and text in it; an existing file is an error
// unless force, since overwriting a cluster key cuts this host out of its cluster.
func writeKeyFile(path string, text []byte, force bool) error {
	flags := os.O_WRONLY | os.O_CREATE | os.O_EXCL
	if force {
		flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s exists; it may be the key of a running cluster (use --force to overwrite it)", path)
	}
	if err != nil {
		return err
	}
	// An existing file keeps its mode under O_TRUNC: make it private before the key is in it.
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(text); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// parseClusterKey reads a key file's content: base64 of exactly ClusterKeySize bytes,
// surrounding white space ignored.
func parseClusterKey(b []byte) ([]byte, error) {
	b = bytes.TrimSpace(b)
	key := make([]byte, base64.StdEncoding.DecodedLen(len(b)))
	n, err := base64.StdEncoding.Decode(key, b)
	if err != nil {
		return nil, fmt.Errorf("not a weft key (base64 of %d bytes, as weft keygen writes): %w", router.ClusterKeySize, err)
	}
	if n != router.ClusterKeySize {
		return nil, fmt.Errorf("holds %d bytes, want %d (make one with weft keygen)", n, router.ClusterKeySize)
	}
	return key[:n], nil
}

// readPrivateFile reads a secret file named by flag, refusing one that group or others
// may read: whoever reads it can join the cluster.
func readPrivateFile(flag, path string) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%s %s is mode %04o, readable by group or others; fix it with `chmod 600 %s`", flag, path, perm, path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	return b, nil
}

// clusterKeyFrom turns the key flags into the cluster key: from a key file, or a
// passphrase file stretched with argon2id and salted with the cluster name; nil with
// --insecure. Exactly one of the three must be given.
func clusterKeyFrom(keyFile, passwordFile, clusterName string, insecure bool) ([]byte, error) {
	set := 0
	for _, on := range []bool{keyFile != "", passwordFile != "", insecure} {
		if on {
			set++
		}
	}
	switch {
	case set > 1 && insecure:
		return nil, errors.New("--insecure together with --key-file or --password-file: choose one")
	case set > 1:
		return nil, errors.New("--key-file and --password-file are both set; use one")
	case insecure:
		return nil, nil
	case keyFile != "":
		b, err := readPrivateFile("--key-file", keyFile)
		if err != nil {
			return nil, err
		}
		key, err := parseClusterKey(b)
		if err != nil {
			return nil, fmt.Errorf("--key-file %s: %w", keyFile, err)
		}
		return key, nil
	case passwordFile != "":
		if clusterName == "" {
			return nil, errors.New("--cluster-name is empty; it salts the passphrase")
		}
		b, err := readPrivateFile("--password-file", passwordFile)
		if err != nil {
			return nil, err
		}
		b = bytes.TrimRight(b, "\r\n")
		if len(b) == 0 {
			return nil, fmt.Errorf("--password-file %s is empty", passwordFile)
		}
		return keyFromPassphrase(b, clusterName), nil
	}
	return nil, errors.New("no cluster key: make one with `weft keygen -o /etc/weft/cluster.key`, copy it to " +
		"every host (mode 0600) and start with `weft peer --key-file /etc/weft/cluster.key` " +
		"(or --password-file with --cluster-name; or --insecure, which lets anyone who reaches this host's ports join)")
}

// keyFromPassphrase stretches a passphrase into a cluster key with argon2id, salted with
// the cluster name. Every gossip packet and probe lets an eavesdropper test guesses
// offline; the stretching makes each guess cost 64 MiB and three passes.
func keyFromPassphrase(pass []byte, clusterName string) []byte {
	salt := []byte(passphraseSaltPrefix + clusterName)
	return argon2.IDKey(pass, salt, passphraseTime, passphraseMemory, passphraseThreads, router.ClusterKeySize)
}
