// go_adal_client.go - go-autorest's adal, the library behind external-dns and older Terraform
// providers, asking the IMDS address (169.254.169.254, hard-coded in adal) for tokens the way such an
// application does. Built offline from Debian's golang-github-azure-go-autorest-dev in GOPATH mode
// (make build/go_adal_client); run by tests/integration/test_proxy_dropin.py.
//
//	go_adal_client '{"scopes": ["https://management.azure.com/.default", ...]}'
//
// Each scope's resource (the scope without "/.default") gets a new token from the MSI endpoint.
// One JSON line per scope on stdout, as py_client.py and js_client.mjs write them:
// {"scope", "ok", "token", "expires_on", "error": {"name", "message"} | null, "elapsed_ms"}.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/Azure/go-autorest/autorest/adal"
)

type result struct {
	Scope     string            `json:"scope"`
	OK        bool              `json:"ok"`
	Token     *string           `json:"token"`
	ExpiresOn string            `json:"expires_on"`
	Error     map[string]string `json:"error"`
	ElapsedMs int64             `json:"elapsed_ms"`
}

func get(endpoint, scope string) result {
	t0 := time.Now()
	r := result{Scope: scope}
	spt, err := adal.NewServicePrincipalTokenFromMSI(endpoint, strings.TrimSuffix(scope, "/.default"))
	if err == nil {
		err = spt.Refresh()
	}
	if err != nil {
		r.Error = map[string]string{"name": fmt.Sprintf("%T", err), "message": err.Error()}
	} else {
		tok := spt.Token()
		r.OK, r.Token, r.ExpiresOn = true, &tok.AccessToken, string(tok.ExpiresOn)
	}
	r.ElapsedMs = time.Since(t0).Milliseconds()
	return r
}

func main() {
	var spec struct {
		Scopes []string `json:"scopes"`
	}
	if len(os.Args) != 2 || json.Unmarshal([]byte(os.Args[1]), &spec) != nil {
		fmt.Fprintln(os.Stderr, `usage: go_adal_client '{"scopes": [...]}'`)
		os.Exit(2)
	}
	endpoint, err := adal.GetMSIVMEndpoint()
	if err != nil {
		fmt.Fprintln(os.Stderr, "adal.GetMSIVMEndpoint:", err)
		os.Exit(1)
	}
	out := json.NewEncoder(os.Stdout)
	for _, scope := range spec.Scopes {
		if err := out.Encode(get(endpoint, scope)); err != nil {
			os.Exit(1)
		}
	}
}
