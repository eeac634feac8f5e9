package router

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/ipam"
)

// FuzzNetworkCreate posts fuzzed bodies to POST /v1/networks of a real peer (alone, in the
// network namespace TestMain made), garbage and valid-but-extreme definitions alike. Every
// answer is JSON. A create that succeeds defines exactly the network it answers, and the
// cluster's networks still pass ipam.CheckNetworks; it is then removed again, so inputs do not
// pile up. A refusal is a cni.Error with a code and a message, 400, 409 or 503 (never a 500),
// and changes no network. Fuzz with -parallel 1 (one peer per namespace), as make fuzz does.
func FuzzNetworkCreate(f *testing.F) {
	for _, s := range []string{
		`{"name":"media","subnet":"10.50.0.0/16"}`,
		`{"name":"media","subnet":"10.50.0.0/16","block_size":24,"mtu":9000,"encrypt":"always","sla":"gold: rtt<=5ms,loss<=0.1%","isolated":false}`,
		`{"name":"control","subnet":"10.60.0.0/24","block_size":30,"mtu":576,"encrypt":"never"}`,
		`{"name":"x","subnet":"10.0.0.0/8","block_size":26}`,
		`{"name":"x","subnet":"10.0.0.0/8","block_size":8}`,
		`{"name":"x","subnet":"0.0.0.0/0","block_size":1}`,
		`{"name":"x","subnet":"10.40.0.0/16"}`,
		`{"name":"default","subnet":"10.40.0.0/16"}`,
		`{"name":"x","subnet":"10.70.0.0/16","mtu":-2147483648}`,
		`{"name":"x","subnet":"10.70.0.0/16","mtu":9223372036854775807}`,
		`{"name":"x","subnet":"10.70.0.0/16","block_size":1e309}`,
		`{"name":"x","subnet":"10.70.0.0/16","sla":"gold: rtt<=NaNms"}`,
		`{"name":"x","subnet":"10.70.0.0/16","sla":"gold: loss<=1e308%"}`,
		`{"name":"x","subnet":"10.70.0.0/16","sla":"` + strings.Repeat("g", 300) + `: rtt<=1ms"}`,
		`{"name":"` + strings.Repeat("a", 300) + `","subnet":"10.70.0.0/16"}`,
		`{"name":"x","subnet":"::/0"}`,
		`{"name":"x","subnet":"10.70.0.0/16","isolated":"yes"}`,
		`{"name":"x\u0000","subnet":"10.70.0.0/16"}`,
		`null`, `[]`, `{}`, ``, `{"name":`,
	} {
		f.Add([]byte(s))
	}
	peer := fuzzPeer(f, func(p *testPeer) error {
		deadline := time.Now().Add(10 * time.Second)
		for len(p.cluster.Networks()) == 0 {
			if time.Now().After(deadline) {
				return fmt.Errorf("the cluster defines no network 10s after start")
			}
			time.Sleep(10 * time.Millisecond) // poll interval
		}
		return nil
	})
	f.Fuzz(func(t *testing.T, body []byte) {
		p, h := peer(t)
		before := p.cluster.Networks()
		req := httptest.NewRequest(http.MethodPost, "http://weft/v1/networks", strings.NewReader(string(body)))
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if !json.Valid(w.Body.Bytes()) {
			t.Fatalf("%q: answer is not JSON: %q", body, w.Body.String())
		}
		after := p.cluster.Networks()
		if w.Code != http.StatusOK {
			var ae cni.Error
			if err := json.Unmarshal(w.Body.Bytes(), &ae); err != nil || ae.Code == 0 || ae.Message == "" {
				t.Fatalf("%q: HTTP %d %q: want a cni.Error with a code and a message", body, w.Code, w.Body.String())
			}
			if w.Code != http.StatusBadRequest && w.Code != http.StatusConflict && w.Code != http.StatusServiceUnavailable {
				t.Fatalf("%q: HTTP %d %s", body, w.Code, ae.Message)
			}
			if !reflect.DeepEqual(before, after) {
				t.Fatalf("%q refused (%d %s) but changed the networks:\nbefore %v\nafter  %v", body, w.Code, ae.Message, before, after)
			}
			return
		}
		var info NetworkInfo
		if err := json.Unmarshal(w.Body.Bytes(), &info); err != nil {
			t.Fatalf("%q: 200 with %q: %v", body, w.Body.String(), err)
		}
		n, ok := p.cluster.Network(info.Name)
		if !ok || !reflect.DeepEqual(networkInfo(n), info) {
			t.Fatalf("%q: answered %+v, the cluster defines %+v (%v)", body, info, n, ok)
		}
		if err := ipam.CheckNetworks(after, nil); err != nil {
			t.Fatalf("%q: accepted, and the networks no longer pass the bounds: %v", body, err)
		}
		if info.Name == ipam.DefaultNetwork {
			return // an identical re-create of the default: nothing to undo
		}
		existed := false
		for _, b := range before {
			existed = existed || b.Name == info.Name
		}
		if existed {
			return // an identical re-create: nothing to undo
		}
		rm := httptest.NewRecorder()
		h.ServeHTTP(rm, httptest.NewRequest(http.MethodDelete, "http://weft/v1/networks/"+info.Name, nil))
		if rm.Code != http.StatusOK {
			t.Fatalf("rm of the just-created %s: %d %s", info.Name, rm.Code, rm.Body.String())
		}
		if got := p.cluster.Networks(); !reflect.DeepEqual(before, got) {
			t.Fatalf("after create and rm of %s: %v, before %v", info.Name, got, before)
		}
	})
}
