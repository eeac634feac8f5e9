package wireguard

// What wireguard-go (golang.zx2c4.com/wireguard, read at v0.0.0-20260522210424) does with
// network namespaces, and why this file exists.
//
// Everything namespace-bound is created by a syscall on some OS thread and lands in that
// thread's namespace:
//
//   - tun.CreateTUN opens /dev/net/tun and issues TUNSETIFF synchronously, and opens its
//     rtnetlink socket for link events synchronously: called inside ns.Do, the TUN and its
//     event socket are in the host namespace.
//   - The UDP sockets are opened by conn.Bind.Open, called from Device.BindUpdate.
//     BindUpdate runs synchronously inside Device.Up() and inside IpcSet("listen_port=…")
//     when the device is up — but also from goroutines wireguard-go owns: the TUN event
//     reader calls Device.Up() when the link goes up (and Down/Up when it flaps), and IpcSet
//     runs in the goroutine serving a UAPI connection, i.e. whenever wgctrl or `wg set`
//     changes the port. Those goroutines run on arbitrary threads, which in a process with
//     several namespaces (tests) are in the process's own namespace, not the host's.
//     BindUpdate also opens the route-listener netlink socket for sticky source addresses,
//     but only when the bind is exactly a *conn.StdNetBind.
//   - tun.NativeTun.MTU() opens a fresh AF_INET socket per call and asks SIOCGIFMTU by
//     name; the event reader calls it on every link change.
//
// So calling Up or IpcSet inside ns.Do is not enough once wgctrl (a UAPI client) is in the
// loop. Observed without the pinning below: the second test host's "listen_port" failed
// with EADDRINUSE, because the first host's socket had been opened by the TUN event
// goroutine in the test process's own namespace, and so was the second's attempt. Rather than run each test host in a subprocess, the driver pins the two
// operations that matter to the host namespace: nsBind.Open and nsTUN.MTU run on a locked
// thread inside it (ns.NetNS.Do), whichever goroutine calls them. Sockets and the TUN keep
// their namespace once created, so reading and writing from any thread is fine.
//
// The pinning is used only when some thread of the process is in another namespace than
// the host's, i.e. in multi-namespace processes such as tests. A
// real weft peer runs wholly inside its host namespace and gets the plain *conn.StdNetBind,
// keeping wireguard-go's route listener for sticky sockets (the wrapper loses it, which only
// matters when the underlay's routes change under a running device).

import (
	"fmt"
	"os"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/tun"
)

// newTUNAndBind creates the TUN (on the calling thread, which must be in hostNS) and the
// UDP bind for the device, pinned to hostNS when the process lives elsewhere.
func newTUNAndBind(name string, mtu int, hostNS ns.NetNS) (tun.Device, conn.Bind, error) {
	tunDev, err := tun.CreateTUN(name, mtu)
	if err != nil {
		return nil, nil, fmt.Errorf("create TUN %s: %w", name, err)
	}
	bind := conn.NewStdNetBind()
	same, err := isProcessNetNS(hostNS)
	if err != nil {
		tunDev.Close()
		return nil, nil, err
	}
	if same {
		return tunDev, bind, nil
	}
	return &nsTUN{Device: tunDev, ns: hostNS}, &nsBind{Bind: bind, ns: hostNS}, nil
}

// isProcessNetNS says whether every thread of the process is in n. Asking only about the
// main thread (/proc/self/ns/net) is not enough: the thread calling this, inside ns.Do, may
// itself be the main thread.
func isProcessNetNS(n ns.NetNS) (bool, error) {
	var host unix.Stat_t
	if err := unix.Fstat(int(n.Fd()), &host); err != nil {
		return false, fmt.Errorf("stat host netns: %w", err)
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return false, fmt.Errorf("list threads: %w", err)
	}
	for _, task := range tasks {
		var st unix.Stat_t
		if err := unix.Stat("/proc/self/task/"+task.Name()+"/ns/net", &st); err != nil {
			continue // the thread exited
		}
		if st.Dev != host.Dev || st.Ino != host.Ino {
			return false, nil
		}
	}
	return true, nil
}

// nsBind opens its UDP sockets inside ns, whichever goroutine asks.
type nsBind struct {
	conn.Bind
	ns ns.NetNS
}

func (b *nsBind) Open(port uint16) (fns []conn.ReceiveFunc, actual uint16, err error) {
	if doErr := b.ns.Do(func(ns.NetNS) error {
		fns, actual, err = b.Bind.Open(port)
		return nil
	}); doErr != nil {
		return nil, 0, fmt.Errorf("enter %s: %w", b.ns.Path(), doErr)
	}
	return fns, actual, err
}

// nsTUN asks the TUN's MTU inside ns (the ioctl names the interface, which only exists
// there).
type nsTUN struct {
	tun.Device
	ns ns.NetNS
}

func (t *nsTUN) MTU() (mtu int, err error) {
	if doErr := t.ns.Do(func(ns.NetNS) error {
		mtu, err = t.Device.MTU()
		return nil
	}); doErr != nil {
		return 0, fmt.Errorf("enter %s: %w", t.ns.Path(), doErr)
	}
	return mtu, err
}
