package router

import (
	"encoding/json"
	"testing"
)

// Gossiped segment records are untrusted: garbage and extreme values are refused without a
// panic, and whatever is kept passes check (bounded networks and tunnel counters).
func FuzzSegmentRecords(f *testing.F) {
	f.Add(remoteRecord(1, 0))
	f.Add([]byte(`{"p":"b","v":18446744073709551615,"b":[{"n":"x","r":60000000,"l":1,"c":1048576}],"t":[{"p":"a","tx":18446744073709551615,"rx":0}]}`))
	f.Add([]byte(`[{"p":"b","v":1},{"p":"","v":2},{"p":"c","v":3,"b":[{"n":"d","r":-1}]}]`))
	f.Add([]byte(`{"p":"b","v":1,"b":[{"n":"x","l":NaN}]}`))
	f.Fuzz(func(t *testing.T, msg []byte) {
		fx := newSegFixture(t, nil)
		fx.s.NotifyMsg(msg)
		fx.s.MergeRemoteState(msg, false)
		fx.ticks(1)
		_ = fx.s.status("")
		var recs []segmentRecord
		if err := json.Unmarshal(fx.s.LocalState(false), &recs); err != nil {
			t.Fatalf("own state does not decode: %v", err)
		}
		for _, r := range recs {
			if r.Peer == fx.s.cfg.Self {
				continue
			}
			if err := r.check(); err != nil {
				t.Fatalf("kept a bad record: %v", err)
			}
		}
	})
}
