package datapath

// Named network namespaces, made and removed as iproute2 does: the lab's hosts and
// containers, and the peer's own short-lived test endpoints (weft perf).

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// NetNSDir is where iproute2 keeps named network namespaces; using it makes every
// namespace visible to `ip netns` and usable with `ip netns exec`.
const NetNSDir = "/run/netns"

// NetNSPath returns the bind-mount path of the named namespace.
func NetNSPath(name string) string { return filepath.Join(NetNSDir, name) }

// CreateNetNS creates a persistent named network namespace the way `ip netns add` does
// and returns its path: NetNSDir is made a shared mount point first, so that namespaces
// created later also appear inside processes that entered a private mount namespace
// earlier (`ip netns exec` unshares the mount namespace). The new namespace is empty:
// not even lo is up.
func CreateNetNS(name string) (string, error) {
	if name == "" || name == "." || name == ".." || filepath.Base(name) != name {
		return "", fmt.Errorf("create netns: bad name %q", name)
	}
	if err := os.MkdirAll(NetNSDir, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", NetNSDir, err)
	}
	if err := unix.Mount("", NetNSDir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		if !errors.Is(err, unix.EINVAL) {
			return "", fmt.Errorf("make %s shared: %w", NetNSDir, err)
		}
		// Not yet a mount point: bind it onto itself, then make it shared.
		if err := unix.Mount(NetNSDir, NetNSDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return "", fmt.Errorf("bind %s: %w", NetNSDir, err)
		}
		if err := unix.Mount("", NetNSDir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
			return "", fmt.Errorf("make %s shared: %w", NetNSDir, err)
		}
	}
	p := NetNSPath(name)
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

// DeleteNetNS removes a named namespace like `ip netns del`. A namespace that is already
// gone is success. The kernel frees the namespace, and every link in it, once the last
// process and file descriptor using it are gone.
func DeleteNetNS(name string) error {
	p := NetNSPath(name)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", name, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", name, err)
	}
	return nil
}
