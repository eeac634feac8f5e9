package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// userHZ is the unit of utime and stime in /proc/<pid>/stat: USER_HZ, 100 on every Linux
// ABI Go runs on (the kernel scales its internal HZ to it for userspace).
const userHZ = 100

var errProcFormat = errors.New("unexpected /proc format")

// parseStatTicks returns utime+stime (fields 14 and 15, in USER_HZ ticks) of one
// /proc/<pid>/stat line. The command name (field 2) is in parentheses and may hold spaces
// and parentheses itself, so fields are counted after its last ')'.
func parseStatTicks(stat string) (uint64, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("%w: stat has no command name: %q", errProcFormat, stat)
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state); utime is field 14, stime 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("%w: stat has %d fields after the name, want ≥ 13", errProcFormat, len(f))
	}
	ut, err := strconv.ParseUint(f[11], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: utime %q: %v", errProcFormat, f[11], err)
	}
	st, err := strconv.ParseUint(f[12], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: stime %q: %v", errProcFormat, f[12], err)
	}
	return ut + st, nil
}

// parseVmRSS returns VmRSS of a /proc/<pid>/status text, in bytes.
func parseVmRSS(status string) (uint64, error) { return parseStatusKB(status, "VmRSS") }

// parseStatusKB returns the "key: N kB" line of a /proc/<pid>/status text, in bytes.
func parseStatusKB(status, key string) (uint64, error) {
	for line := range strings.SplitSeq(status, "\n") {
		rest, ok := strings.CutPrefix(line, key+":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("%w: %s line %q", errProcFormat, key, line)
		}
		kb, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%w: %s %q: %v", errProcFormat, key, f[0], err)
		}
		return kb << 10, nil
	}
	return 0, fmt.Errorf("%w: no %s line (a zombie?)", errProcFormat, key)
}

// memUse is a process's resident memory, in bytes: all of it, and the part that is
// anonymous (heap, stacks: its own). The rest is file pages (the binary's text), which
// all processes of one binary share although each one's VmRSS counts them. pss is the
// proportional set size (/proc/<pid>/smaps_rollup): every shared page divided among the
// processes mapping it, the fair per-process figure when N peers run one binary.
type memUse struct{ rss, anon, pss uint64 }

// cpuTicks returns the CPU time process pid has used so far, in USER_HZ ticks.
func cpuTicks(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatTicks(string(b))
}

// rssBytes returns the resident set size of process pid, and its anonymous part.
func rssBytes(pid int) (memUse, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memUse{}, err
	}
	rss, err := parseVmRSS(string(b))
	if err != nil {
		return memUse{}, err
	}
	anon, err := parseStatusKB(string(b), "RssAnon")
	if err != nil {
		return memUse{}, err
	}
	// smaps_rollup has the same "Key:  N kB" lines as status.
	rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return memUse{}, err
	}
	pss, err := parseStatusKB(string(rollup), "Pss")
	if err != nil {
		return memUse{}, err
	}
	return memUse{rss: rss, anon: anon, pss: pss}, nil
}

// cpuTimes returns the machine's busy and total time from the first line of /proc/stat,
// in USER_HZ ticks over all cores; idle and iowait count as not busy.
func cpuTimes() (busy, total uint64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	return parseCPULine(strings.SplitN(string(b), "\n", 2)[0])
}

// parseCPULine parses the aggregate "cpu  user nice system idle iowait irq softirq steal
// ..." line of /proc/stat. Guest time is already inside user and nice.
func parseCPULine(line string) (busy, total uint64, err error) {
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("%w: /proc/stat cpu line %q", errProcFormat, line)
	}
	for i, s := range f[1:min(len(f), 9)] { // user..steal
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%w: /proc/stat field %d %q", errProcFormat, i+1, s)
		}
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total, nil
}

// loadAvg returns the 1-minute load average.
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return -1
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return -1
	}
	return v
}

// neighDir holds the kernel's neighbour-table limits. They are global (the table is
// shared by every network namespace): a lab of N hosts on one bridge needs about N²
// entries, and the default gc_thresh3 of 1024 drops packets from N≈32 on, which looks
// like a gossip failure.
const neighDir = "/proc/sys/net/ipv4/neigh/default"

var neighWant = [3]int{8192, 32768, 65536} // gc_thresh1, 2, 3

// raiseNeighLimits raises gc_thresh1/2/3 to at least neighWant (never lowers them) and
// returns a function that restores the values it found.
func raiseNeighLimits() (restore func() error, err error) {
	var old [3]int
	for i := range old {
		b, err := os.ReadFile(filepath.Join(neighDir, fmt.Sprintf("gc_thresh%d", i+1)))
		if err != nil {
			return nil, fmt.Errorf("read neighbour limits: %w", err)
		}
		if old[i], err = strconv.Atoi(strings.TrimSpace(string(b))); err != nil {
			return nil, fmt.Errorf("read neighbour limits: gc_thresh%d: %w", i+1, err)
		}
	}
	write := func(v [3]int) error {
		// gc_thresh3 first when raising, last when lowering, so that 1 ≤ 2 ≤ 3 holds
		// at every step (the kernel does not insist, but a reader might).
		order := []int{2, 1, 0}
		if v[2] < old[2] {
			order = []int{0, 1, 2}
		}
		var errs []error
		for _, i := range order {
			p := filepath.Join(neighDir, fmt.Sprintf("gc_thresh%d", i+1))
			if err := os.WriteFile(p, []byte(strconv.Itoa(v[i])), 0o644); err != nil {
				errs = append(errs, fmt.Errorf("write %s: %w", p, err))
			}
		}
		return errors.Join(errs...)
	}
	want := old
	for i := range want {
		want[i] = max(want[i], neighWant[i])
	}
	if want == old {
		return func() error { return nil }, nil
	}
	if err := write(want); err != nil {
		return nil, err
	}
	return func() error { return write(old) }, nil
}
