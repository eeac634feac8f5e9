package router

import (
	"encoding/json"
	"html/template"
	"net/http"
	"net/http/pprof"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

var statusPage = template.Must(template.New("status").Parse(`<!doctype html>
<html><head><meta charset="utf-8"><title>weft · {{.Name}}</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}</style>
</head><body>
<h1>weft peer {{.Name}}</h1>
<p>version {{.Version}} · up {{.Uptime}} · <a href="/metrics">metrics</a> · <a href="/status">status JSON</a></p>
<h2>Networks</h2>
<table><tr><th>network</th><th>subnet</th><th>bridge</th><th>gateway</th><th>blocks (used/free)</th></tr>
{{range .Networks}}<tr><td>{{.Name}}</td><td>{{.Subnet}}</td><td>{{.Bridge}}</td><td>{{.Gateway}}</td>
<td>{{range .Blocks}}{{.CIDR}} ({{.Used}}/{{.Free}}) {{end}}</td></tr>{{end}}
</table>
<h2>Attachments</h2>
<table><tr><th>name</th><th>address</th><th>container</th><th>ifname</th><th>host interface</th></tr>
{{range .Attachments}}<tr><td>{{.Name}}</td><td>{{.Address}}</td><td>{{.ContainerID}}</td><td>{{.IfName}}</td><td>{{.HostIfName}}</td></tr>{{end}}
</table></body></html>
`))

// httpHandler serves the loopback listener: Prometheus metrics, status JSON and a page.
func (p *Peer) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(p.reg, promhttp.HandlerOpts{Registry: p.reg}))
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(p.status())
	})
	if p.cfg.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		statusPage.Execute(w, p.status())
	})
	return mux
}
