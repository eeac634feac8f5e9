package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/containernetworking/cni/libcni"

	"github.com/weftnet/weft/datapath/nslab"
)

// Container is a network namespace standing in for a container on a host.
type Container struct {
	Host   *Host
	Name   string // namespace name: <prefix>-h<i>-c<j>
	ID     string // CNI container ID; defaults to Name
	NSPath string // /run/netns/<Name>
}

// NewContainer creates a fresh container namespace on h with lo up. It is deleted by
// Container.Delete or at the latest by Lab.Close.
func (h *Host) NewContainer() (*Container, error) {
	h.mu.Lock()
	j := h.nextCtr
	h.nextCtr++
	h.mu.Unlock()
	name := h.Name + "-c" + strconv.Itoa(j)
	p, err := nslab.CreateNetNS(name)
	if err != nil {
		return nil, err
	}
	c := &Container{Host: h, Name: name, ID: name, NSPath: p}
	nh, err := nslab.HandleAt(p)
	if err == nil {
		err = nslab.LinkUp(nh, "lo")
		nh.Close()
	}
	if err != nil {
		nslab.DeleteNetNS(name)
		return nil, err
	}
	h.mu.Lock()
	h.containers = append(h.containers, c)
	h.mu.Unlock()
	return c, nil
}

// RuntimeConf returns the libcni runtime arguments for attaching interface ifname.
func (c *Container) RuntimeConf(ifname string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: c.ID, NetNS: c.NSPath, IfName: ifname}
}

// Exec runs a command inside the container namespace and returns its combined output.
func (c *Container) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	return nsExec(ctx, c.Name, name, args...)
}

// Ping sends one ICMP echo to dst from inside the container and waits up to a second for
// the answer. Wrap it in Poll to wait for connectivity.
func (c *Container) Ping(ctx context.Context, dst netip.Addr) error {
	_, err := c.Exec(ctx, "ping", "-c", "1", "-W", "1", "-q", dst.String())
	return err
}

// LinkNames returns the names of the links in the container namespace.
func (c *Container) LinkNames() ([]string, error) { return linkNames(c.NSPath) }

// DeleteLink deletes a link inside the container namespace.
func (c *Container) DeleteLink(name string) error {
	nh, err := nslab.HandleAt(c.NSPath)
	if err != nil {
		return err
	}
	defer nh.Close()
	l, err := nh.LinkByName(name)
	if err != nil {
		return fmt.Errorf("lab: find %s in %s: %w", name, c.Name, err)
	}
	return nh.LinkDel(l)
}

// Delete removes the container namespace (and with it the container end of every veth).
// Deleting twice is success.
func (c *Container) Delete() error {
	h := c.Host
	h.mu.Lock()
	for i, x := range h.containers {
		if x == c {
			h.containers = append(h.containers[:i], h.containers[i+1:]...)
			break
		}
	}
	h.mu.Unlock()
	return nslab.DeleteNetNS(c.Name)
}

func (h *Host) deleteContainers() error {
	h.mu.Lock()
	cs := h.containers
	h.containers = nil
	h.mu.Unlock()
	var errs []error
	for _, c := range cs {
		errs = append(errs, nslab.DeleteNetNS(c.Name))
	}
	return errors.Join(errs...)
}
