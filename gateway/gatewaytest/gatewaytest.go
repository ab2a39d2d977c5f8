// Package gatewaytest holds test helpers for the gateway's HTTP API, shared by the gateway's own tests
// and the end-to-end tests of the servers that embed it (the coordinator's).
package gatewaytest

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
)

// Call sends method url with body (JSON, when not empty) and returns the response's status, headers and
// body; it fails tb when the request cannot be made or read.
func Call(tb testing.TB, ctx context.Context, method, url, body string) (int, http.Header, []byte) {
	tb.Helper()
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	if err != nil {
		tb.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatalf("%s %s: reading the body: %v", method, url, err)
	}
	return resp.StatusCode, resp.Header, data
}

// Events splits a complete Server-Sent Events body into the data of its events, checking the framing
// ("data: ...\n\n" each) and that "data: [DONE]" comes last; it fails tb otherwise.
func Events(tb testing.TB, body []byte) []string {
	tb.Helper()
	s := string(body)
	if !strings.HasSuffix(s, "data: [DONE]\n\n") {
		tb.Fatalf("stream %q does not end with data: [DONE]", s)
	}
	var out []string
	for _, ev := range strings.Split(strings.TrimSuffix(s, "data: [DONE]\n\n"), "\n\n") {
		if ev == "" {
			continue
		}
		data, ok := strings.CutPrefix(ev, "data: ")
		if !ok || strings.Contains(data, "\n") {
			tb.Fatalf("stream event %q, want one data: line", ev)
		}
		out = append(out, data)
	}
	return out
}
