package lab

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Capture records every frame on one interface of a host's namespace (AF_PACKET, both
// directions), so tests can check what crosses the underlay.
type Capture struct {
	fd   int
	stop atomic.Bool
	done chan struct{}

	mu     sync.Mutex // guards frames
	frames [][]byte
}

// Capture starts recording frames on ifname in h's namespace.
func (h *Host) Capture(ifname string) (*Capture, error) {
	c := &Capture{done: make(chan struct{})}
	err := h.Do(func() error {
		link, err := netlinkLinkIndex(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		c.fd = fd
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: link}); err != nil {
			unix.Close(fd)
			return err
		}
		tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	})
	if err != nil {
		return nil, fmt.Errorf("lab: capture on %s/%s: %w", h.Name, ifname, err)
	}
	go func() {
		defer close(c.done)
		buf := make([]byte, 1<<17)
		for {
			n, _, err := unix.Recvfrom(c.fd, buf, 0)
			if err != nil {
				// A timeout means the queue is empty: the end, once stopped.
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

func netlinkLinkIndex(name string) (int, error) {
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
