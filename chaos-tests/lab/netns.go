package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// netnsDir is where iproute2 keeps named network namespaces; using it makes every lab
// namespace visible to `ip netns` and usable with `ip netns exec`.
const netnsDir = "/run/netns"

// netnsPath returns the bind-mount path of the named namespace.
func netnsPath(name string) string { return filepath.Join(netnsDir, name) }

// createNetNS creates a persistent named network namespace the way `ip netns add` does:
// /run/netns is made a shared mount point first, so that namespaces created later also
// appear inside processes that entered a private mount namespace earlier (the peers run
// under `ip netns exec`, which unshares the mount namespace and opens netns paths the
// plugin hands it).
func createNetNS(name string) (string, error) {
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", netnsDir, err)
	}
	if err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		if !errors.Is(err, unix.EINVAL) {
			return "", fmt.Errorf("make %s shared: %w", netnsDir, err)
		}
		// Not yet a mount point: bind it onto itself, then make it shared.
		if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return "", fmt.Errorf("bind %s: %w", netnsDir, err)
		}
		if err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
			return "", fmt.Errorf("make %s shared: %w", netnsDir, err)
		}
	}
	p := netnsPath(name)
	f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return "", fmt.Errorf("create netns %s: %w", name, err)
	}
	f.Close()

	errc := make(chan error, 1)
	go func() {
		// The thread switches to a fresh namespace and is never unlocked: when this
		// goroutine returns the runtime discards the thread instead of reusing a thread
		// that sits in the wrong namespace (pkg/ns README, "namespaces done safely").
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare netns: %w", err)
			return
		}
		src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(src, p, "none", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind netns to %s: %w", p, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(p)
		return "", fmt.Errorf("create netns %s: %w", name, err)
	}
	return p, nil
}

// deleteNetNS removes a named namespace like `ip netns del`. A namespace that is already
// gone is success. The kernel frees the namespace, and every link in it, once the last
// process and file descriptor using it are gone.
func deleteNetNS(name string) error {
	p := netnsPath(name)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", name, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", name, err)
	}
	return nil
}

// listNetNS returns the names of the named namespaces that belong to a lab with prefix:
// "<prefix>-ul" and "<prefix>-h…".
func listNetNS(prefix string) ([]string, error) {
	ents, err := os.ReadDir(netnsDir)
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
