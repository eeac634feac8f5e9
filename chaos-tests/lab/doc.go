// Package lab builds a throwaway multi-host weft lab on one Linux machine.
//
// Every "host" is a network namespace joined by a veth to a bridge in a shared underlay
// namespace, and runs a real `weft peer` process (started with `ip netns exec`, so the
// peer does its kernel work in the host's namespace). "Containers" are further network
// namespaces attached through libcni and the real `weft` CNI plugin. The chaos tests,
// `make demo` and the CNI benchmark all build on it.
//
// Naming: every namespace and every link the lab creates carries Config.Prefix:
//
//	<prefix>-ul          underlay namespace, holding bridge <prefix>br
//	<prefix>-h<i>        host i; eth0 (underlay address) and lo; its peer of veth <prefix>h<i>
//	<prefix>-h<i>-c<j>   container j of host i
//
// Two labs running at the same time must use different prefixes. New removes namespaces
// left behind by an earlier lab with the same prefix (a crashed test run), so a prefix must
// never be shared with something that is not a lab.
//
// Cluster key: New writes a random key to <dir>/cluster.key (mode 0600; Lab.KeyFile) and
// every peer gets `--key-file` with it, unless the test's flags give --key-file,
// --password-file or --insecure themselves. With a key, `--encrypt auto` means WireGuard;
// so that tests keep measuring what they were written for, the lab also passes
// `--encrypt never` unless the test's flags set --encrypt.
//
// Safety: the lab only signals processes it started itself (by PID, through the
// *os.Process it holds), and peers are started with PDEATHSIG=SIGKILL so that they do not
// outlive the process that runs the lab. Traffic stays inside the lab's namespaces.
//
// Concurrency: a Lab and its Hosts may be used from several goroutines; each Host guards
// its peer process and container list with its own mutex. Close must not race with other
// calls on the same Lab.
//
// The lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), the `ip` tool (iproute2) and `ping`.
package lab
