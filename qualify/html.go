package qualify

import (
	"fmt"
	"html/template"
	"path/filepath"
	"strings"
	"time"
)

// view is what the page template sees: the report, and where the page lives (artifact links
// are relative to it, so the output directory can be moved or archived whole).
type view struct {
	*Report
	dir string
}

func (v view) Rel(path string) string {
	if path == "" {
		return ""
	}
	if r, err := filepath.Rel(v.dir, path); err == nil {
		return filepath.ToSlash(r)
	}
	return path
}

var funcs = template.FuncMap{
	"dur": func(d time.Duration) string { return d.Round(time.Millisecond).String() },
	"ms":  func(d time.Duration) string { return fmt.Sprintf("+%.3f s", d.Seconds()) },
	"class": func(state string) string {
		switch strings.ToLower(state) {
		case "passed":
			return "pass"
		case "skipped", "pending":
			return "skip"
		}
		return "fail"
	},
	"stopped": func(s string) string {
		if s == "" {
			return "not refused (the spec shows what is accepted)"
		}
		return s
	},
	"join": strings.Join,
	"when": func(t time.Time) string { return t.Format("2006-01-02 15:04:05 MST") },
	"f1":   func(f float64) string { return fmt.Sprintf("%.0f", f) },
}

// page is the whole report: inline style, no script, no fetch: it reads the same offline.
var page = template.Must(template.New("report").Funcs(funcs).Parse(`<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{{.Title}}: {{.Summary.Verdict}}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{margin:0 0 .3em} h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f2f2f2} .pass{color:#176b24} .fail{color:#b00020;font-weight:bold} .skip{color:#777}
.verdict{font-size:1.6em;font-weight:bold} code,.mono{font-family:ui-monospace,monospace;font-size:12px}
details{margin:.2em 0} summary{cursor:pointer} .actor-proxy{color:#555} .actor-verifier{color:#0b4f8a}
</style></head><body>
<h1>{{.Title}}</h1>
<p id="verdict" class="verdict {{if eq .Summary.Verdict "PASS"}}pass{{else}}fail{{end}}">{{.Summary.Verdict}}</p>
<section id="summary"><h2>Summary</h2>
<p><span id="count-total">{{.Summary.Total}} specs</span>: <span class="pass" id="count-passed">{{.Summary.Passed}} passed</span>,
<span class="fail" id="count-failed">{{.Summary.Failed}} failed</span>, <span class="skip" id="count-skipped">{{.Summary.Skipped}} skipped</span>
in {{dur .Summary.Duration}}; generated {{when .Generated}}.</p>
{{with .Explorer}}<p id="explorer">Explorer: seed {{.Seed}}, {{.Sequences}} sequences, {{.Steps}} steps in {{dur .Duration}} ({{f1 .StepsPerMin}} steps/min):
{{if .Violation}}<span class="fail">{{.Violation}}</span> — replay <code>{{.Replay}}</code>{{else}}<span class="pass">no invariant broke</span>{{end}}</p>{{end}}
</section>
<section id="environment"><h2>Environment</h2><table>
<tr><th>commit</th><td class="mono">{{.Env.Commit}}</td></tr>
<tr><th>Go</th><td>{{.Env.GoVersion}}</td></tr>
<tr><th>host kernel</th><td>{{.Env.HostKernel}}</td></tr>
<tr><th>machine</th><td>{{.Env.Machine}}</td></tr>
<tr><th>QEMU</th><td>{{.Env.QEMU}}</td></tr>
<tr><th>accelerator (probe)</th><td>{{.Env.Accelerator}}</td></tr>
<tr><th>guest kernel</th><td>{{.Env.GuestKernel}}</td></tr>
<tr><th>label filter</th><td class="mono">{{.Env.Labels}}</td></tr>
<tr><th>Ginkgo seed</th><td>{{.Env.GinkgoSeed}}</td></tr>
{{range $k, $v := .Env.Seeds}}<tr><th>fresh {{$k}} seed</th><td>{{$v}}</td></tr>{{end}}
</table></section>
<section id="attacks"><h2>Attack matrix</h2>
<table id="attack-matrix"><tr><th>attack (spec)</th><th>result</th><th>stopped by</th><th>guest's reason</th><th>verifier's audit</th><th>bundle</th></tr>
{{range .Attacks}}<tr><td>{{.Spec}}</td><td class="{{class .State}}">{{.State}}</td><td class="stopped">{{stopped .StoppedBy}}</td>
<td class="mono">{{.GuestReason}}</td><td class="mono">{{.Audit}}</td><td>{{if .Artifacts}}<a href="{{$.Rel .Artifacts}}">artifacts</a>{{end}}</td></tr>
{{end}}</table></section>
<section id="specs"><h2>Specs</h2>
{{range $i, $s := .Specs}}<details class="spec" id="spec-{{$i}}"><summary><span class="{{class .State}}">{{.State}}</span> {{.Name}} <span class="skip">({{dur .Duration}}{{if .Labels}}; {{join .Labels ", "}}{{end}})</span></summary>
{{if .Failure}}<pre class="fail">{{.Failure}}</pre>{{end}}
{{if .Seed}}<p>seed {{.Seed}}</p>{{end}}
{{if .Artifacts}}<p><a href="{{$.Rel .Artifacts}}">artifact bundle</a></p>{{end}}
{{if .Timeline}}<table class="timeline"><tr><th>time</th><th>who</th><th>what</th><th>detail</th></tr>
{{range .Timeline}}<tr><td class="mono">{{ms .Offset}}</td><td class="actor-{{.Actor}}">{{.Actor}}</td><td>{{.What}}</td><td class="mono">{{.Detail}}</td></tr>
{{end}}</table>{{end}}
</details>
{{end}}</section>
<p class="skip">{{.Env.ReportFormat}}</p>
</body></html>
`))
