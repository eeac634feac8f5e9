package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
)

func TestCheckLabel(t *testing.T) {
	long := strings.Repeat("a", 63)
	for _, ok := range [][2]string{
		{"app", "db"}, {"app", ""}, {"tier", "back-end_1.x"}, {"example.com/app", "db"}, {"a.b-c.d/X_y.z", "V"},
		{long, long}, {strings.Repeat("a", 253) + "/n", "v"},
	} {
		if err := CheckLabel(ok[0], ok[1]); err != nil {
			t.Errorf("CheckLabel(%q, %q) = %v, want valid", ok[0], ok[1], err)
		}
	}
	for _, bad := range []struct{ k, v, want string }{
		{"", "v", "name"},
		{"-app", "v", "name"},
		{"app-", "v", "name"},
		{"a b", "v", "name"},
		{long + "a", "v", "name"},
		{"app", long + "a", "value"},
		{"app", "-db", "value"},
		{"app", "d=b", "value"},
		{"Example.com/app", "v", "prefix"},
		{"/app", "v", "prefix"},
		{"ex_ample.com/app", "v", "prefix"},
		{strings.Repeat("a", 254) + "/n", "v", "prefix"},
		{"example.com/", "v", "name"},
		{"a/b/c", "v", "name"},
	} {
		err := CheckLabel(bad.k, bad.v)
		if err == nil || !strings.Contains(err.Error(), bad.want) || !strings.Contains(err.Error(), fmt.Sprintf("%q", bad.k)) {
			t.Errorf("CheckLabel(%q, %q) = %v, want an error about the %s naming the label", bad.k, bad.v, err, bad.want)
		}
	}
}

func TestContainerLabels(t *testing.T) {
	conf := func(labels string) *NetConf {
		c, err := ParseConf([]byte(`{"cniVersion":"1.1.0","name":"n","type":"weft","args":{"cni":{"labels":` + labels + `}}}`))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	for _, tt := range []struct {
		labels, arg string
		want        map[string]string
	}{
		{`[]`, "", nil},
		{`[{"key":"app","value":"db"}]`, "", map[string]string{"app": "db"}},
		{`[]`, "app:db,tier:back", map[string]string{"app": "db", "tier": "back"}},
		// CNI_ARGS wins on the same key; the others add up.
		{`[{"key":"app","value":"db"},{"key":"zone","value":"a"}]`, "app:web, tier:back,", map[string]string{"app": "web", "tier": "back", "zone": "a"}},
		{`[{"key":"app","value":"db"},{"key":"app","value":"db"}]`, "app:db,app:db", map[string]string{"app": "db"}},
		{`[{"key":"example.com/empty","value":""}]`, "", map[string]string{"example.com/empty": ""}},
	} {
		got, err := ContainerLabels(conf(tt.labels), ContainerArgs{LabelsArg: tt.arg})
		if err != nil || !maps.Equal(got, tt.want) || (tt.want == nil) != (got == nil) {
			t.Errorf("labels %s + %q = %v, %v; want %v", tt.labels, tt.arg, got, err, tt.want)
		}
	}
	// A conflist without args reads no labels.
	plain, _ := ParseConf([]byte(`{"cniVersion":"1.1.0","name":"n","type":"weft"}`))
	if got, err := ContainerLabels(plain, ContainerArgs{}); got != nil || err != nil {
		t.Errorf("no args: %v %v", got, err)
	}

	var many, manyArg []string
	for i := 0; i < MaxLabels; i++ {
		many = append(many, fmt.Sprintf(`{"key":"k%d","value":"v"}`, i))
		manyArg = append(manyArg, fmt.Sprintf("a%d:v", i))
	}
	for _, tt := range []struct {
		labels, arg string
		code        uint
		want        string
	}{
		{`[{"key":"bad key","value":"db"}]`, "", types.ErrInvalidNetworkConfig, `args.cni.labels: label "bad key"`},
		{`[{"key":"app","value":"d/b"}]`, "", types.ErrInvalidNetworkConfig, `label "app": value "d/b"`},
		{`[{"key":"app","value":"db"},{"key":"app","value":"web"}]`, "", types.ErrInvalidNetworkConfig, `"app" is given twice`},
		{`[]`, "app", types.ErrInvalidEnvironmentVariables, `WEFT_LABELS: label "app" is not KEY:VALUE`},
		{`[]`, "app:db,app:web", types.ErrInvalidEnvironmentVariables, `"app" is given twice`},
		{`[]`, "-x:db", types.ErrInvalidEnvironmentVariables, `WEFT_LABELS: label "-x"`},
		{`[` + strings.Join(many, ",") + `,{"key":"one","value":"more"}]`, "", types.ErrInvalidNetworkConfig, "together, at most 32"},
		{`[]`, strings.Join(manyArg, ",") + ",b:v", types.ErrInvalidEnvironmentVariables, "33 labels, at most 32"},
		{`[` + strings.Join(many, ",") + `]`, "extra:v", types.ErrInvalidNetworkConfig, "together, at most 32"},
	} {
		_, err := ContainerLabels(conf(tt.labels), ContainerArgs{LabelsArg: tt.arg})
		var e *types.Error
		if !errors.As(err, &e) || !strings.Contains(e.Error(), tt.want) || e.Code != tt.code {
			t.Errorf("labels %.60s + %.60q = %v, want code %d mentioning %q", tt.labels, tt.arg, err, tt.code, tt.want)
		}
	}
	if _, err := ParseConf([]byte(`{"cniVersion":"1.1.0","name":"n","type":"weft","args":{"cni":{"labels":"app=db"}}}`)); err == nil {
		t.Error("labels that are not a list decoded")
	}
}

// ADD carries the labels to the peer; a bad label fails ADD before the peer is asked, and
// DEL with the same arguments still reaches the peer.
func TestAddCarriesLabels(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "weft.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var got []AttachRequest
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req AttachRequest
		json.NewDecoder(r.Body).Decode(&req)
		mu.Lock()
		got = append(got, req)
		mu.Unlock()
		if r.URL.Path == PathDel {
			json.NewEncoder(w).Encode(struct{}{})
			return
		}
		json.NewEncoder(w).Encode(AttachResult{IfName: req.IfName, NetNS: req.NetNS, HostIfName: "weftabc", Bridge: "weft",
			Address: "10.40.0.5/16", Gateway: "10.40.0.1", MTU: 1420})
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	conf := []byte(`{"cniVersion":"1.1.0","name":"n","type":"weft","socket":"` + sock + `","args":{"cni":{"labels":[{"key":"app","value":"db"},{"key":"zone","value":"a"}]}}}`)
	p := Plugin{Stdout: &strings.Builder{}}
	if err := p.Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: "/x", Args: "WEFT_LABELS=app:web,tier:back", StdinData: conf}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if len(got) != 1 || !maps.Equal(got[0].Labels, map[string]string{"app": "web", "tier": "back", "zone": "a"}) {
		t.Fatalf("peer got %+v", got)
	}
	mu.Unlock()
	bad := &skel.CmdArgs{ContainerID: "c2", IfName: "eth0", Netns: "/x", Args: "WEFT_LABELS=app:w=b", StdinData: conf}
	var e *types.Error
	if err := p.Add(bad); !errors.As(err, &e) || e.Code != types.ErrInvalidEnvironmentVariables || !strings.Contains(e.Msg, `label "app"`) {
		t.Fatalf("ADD with a bad label = %v", err)
	}
	if err := p.Del(bad); err != nil {
		t.Fatalf("DEL with a bad label = %v, want it to reach the peer", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 2 || got[1].ContainerID != "c2" || got[1].Labels != nil {
		t.Fatalf("after the bad ADD and its DEL the peer got %+v", got)
	}
}
