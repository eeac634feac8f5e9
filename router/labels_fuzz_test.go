package router

import (
	"encoding/json"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// FuzzLabelMessage feeds garbage and extreme records to the label store's gossip decoders:
// whatever arrives, every record held passes check, and no peer holds more than the bound.
func FuzzLabelMessage(f *testing.F) {
	f.Add([]byte(`{"r":[{"p":"a","a":"10.40.0.2","c":"c","n":"default","l":{"app":"db"},"v":1}]}`))
	f.Add([]byte(`{"r":[{"p":"a","a":"::1","c":"c","n":"n","v":18446744073709551615,"d":true}]}`))
	f.Add([]byte(`{"r":[{"p":"","a":"x"}]}`))
	f.Add([]byte(`{"r":null}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := newLabelStore(labelStoreConfig{Self: "self", Registerer: prometheus.NewRegistry()})
		if err != nil {
			t.Fatal(err)
		}
		s.NotifyMsg(data)
		s.MergeRemoteState(data, false)
		s.mu.Lock()
		defer s.mu.Unlock()
		for k, r := range s.recs {
			if err := r.check(); err != nil || k.peer != r.Peer || k.addr != r.Addr || r.Peer == "self" {
				t.Fatalf("held %+v under %v: %v", r, k, err)
			}
		}
		for peer, n := range s.perPeer {
			if n > maxLabelRecordsPerPeer {
				t.Fatalf("peer %s holds %d records", peer, n)
			}
		}
		var m labelMessage
		if json.Unmarshal(data, &m) == nil && len(m.Records) > 0 && len(s.recs) > len(m.Records) {
			t.Fatalf("%d records held from a message of %d", len(s.recs), len(m.Records))
		}
	})
}
