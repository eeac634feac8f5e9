package nslab

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// Capture records every frame on one interface of a namespace (AF_PACKET, both
// directions), so tests can check what crosses a link.
type Capture struct {
	fd   int
	stop atomic.Bool
	done chan struct{}

	mu     sync.Mutex // guards frames
	frames [][]byte
}

// StartCapture starts recording frames on ifname in the namespace at nsPath. Stop ends it.
func StartCapture(nsPath, ifname string) (*Capture, error) {
	n, err := ns.GetNS(nsPath)
	if err != nil {
		return nil, fmt.Errorf("capture: open %s: %w", nsPath, err)
	}
	defer n.Close()
	c := &Capture{done: make(chan struct{})}
	err = n.Do(func(ns.NetNS) error {
		ifi, err := ifIndex(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi}); err != nil {
			unix.Close(fd)
			return err
		}
		// A short receive timeout lets the reader notice Stop.
		tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			unix.Close(fd)
			return err
		}
		c.fd = fd
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("capture on %s in %s: %w", ifname, nsPath, err)
	}
	go func() {
		defer close(c.done)
		buf := make([]byte, 1<<17)
		for {
			n, _, err := unix.Recvfrom(c.fd, buf, 0)
			if err != nil {
				// A timeout means the queue is empty: the end, once stopped. Frames queued
				// before Stop are all read first.
				if c.stop.Load() {
					return
				}
				continue
			}
			c.mu.Lock()
			c.frames = append(c.frames, append([]byte(nil), buf[:n]...))
			c.mu.Unlock()
		}
	}()
	return c, nil
}

// Stop ends the capture (safe twice) and returns the frames seen.
func (c *Capture) Stop() [][]byte {
	if !c.stop.Swap(true) {
		<-c.done
		unix.Close(c.fd)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.frames
}

// ifIndex is the index of the interface name in the calling thread's namespace.
func ifIndex(name string) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return 0, err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
		return 0, fmt.Errorf("index of %s: %w", name, err)
	}
	return int(ifr.Uint32()), nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
