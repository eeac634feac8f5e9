package router

import (
	"errors"
	"log/slog"
	"net/http"
	"net/netip"
	"testing"

	"github.com/weftnet/weft/dns"
)

// `weft dns add` with a bad --service answers 400 and publishes nothing: not the name, not
// the good services.
func TestDNSAddValidatesEverythingBeforePublishing(t *testing.T) {
	recs, err := dns.NewRecords("self", nil)
	if err != nil {
		t.Fatal(err)
	}
	sent := 0
	rep, err := dns.NewReplicator(dns.ReplicatorConfig{Records: recs, Broadcast: func([]byte) error { sent++; return nil }})
	if err != nil {
		t.Fatal(err)
	}
	p := &Peer{dnsRep: rep, log: slog.New(slog.DiscardHandler)}
	for _, svc := range []string{"BAD!/tcp/80", "http/sctp/80", "http/tcp/0", "http/tcp", "h_p/tcp/80", "/tcp/80"} {
		err := p.dnsAdd(DNSRequest{Name: "web", Addrs: []string{"10.40.0.2"}, Services: []string{"http/tcp/80", svc}})
		var ae *apiError
		if !errors.As(err, &ae) || ae.status != http.StatusBadRequest {
			t.Fatalf("service %q: err = %v, want a 400", svc, err)
		}
		if recs.Generation() != 0 || sent != 0 {
			t.Fatalf("service %q: the request was refused but %d broadcasts went out, store generation %d", svc, sent, recs.Generation())
		}
	}
	if err := p.dnsAdd(DNSRequest{Name: "web", Addrs: []string{"10.40.0.2"}, Services: []string{"http/tcp/80"}}); err != nil {
		t.Fatal(err)
	}
	if ts, _ := recs.LookupName("web"); len(ts) != 1 || len(recs.LookupSRV("web", "http", "tcp")) != 1 || sent != 1 {
		t.Fatalf("good request: targets %v, %d broadcasts", ts, sent)
	}
	// A CNI attachment with a bad service keeps its name and good services.
	p.registerName("db", netip.MustParseAddr("10.40.0.3"), []string{"BAD!/tcp/1", "pg/tcp/5432"})
	if ts, _ := recs.LookupName("db"); len(ts) != 1 || len(recs.LookupSRV("db", "pg", "tcp")) != 1 {
		t.Fatalf("attachment with a bad service: %v", ts)
	}
}
