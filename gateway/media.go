package gateway

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// The defaults of MediaConfig.
const (
	// DefaultMaxImageBytes bounds an image's encoded bytes, from a data URL or fetched: 20 MiB.
	DefaultMaxImageBytes = 20 << 20
	// DefaultMediaTimeout bounds the fetch of one image URL, redirects and body included.
	DefaultMediaTimeout = 10 * time.Second
	// DefaultMaxRedirects bounds the redirects one image URL may take.
	DefaultMaxRedirects = 3
)

// MediaConfig says which images a chat request's image_url parts may name. Data URLs (base64) are always
// read; http(s) URLs are fetched only from AllowedDomains, each fetch bounded in bytes, time and
// redirects. The zero value refuses URLs and takes the defaults.
type MediaConfig struct {
	// AllowedDomains are the hosts whose http(s) image URLs the gateway fetches, as vLLM's
	// --allowed-media-domains: a host matches a domain equal to it or of which it is a subdomain;
	// "*" allows any host. Empty: URLs are refused (400), only data URLs are read.
	AllowedDomains []string `json:"allowed-media-domains"`
	// MaxBytes bounds one image's encoded bytes. Zero: DefaultMaxImageBytes.
	MaxBytes int64 `json:"media-max-bytes"`
	// Timeout bounds one URL's fetch. Zero: DefaultMediaTimeout.
	Timeout time.Duration `json:"media-timeout"`
	// MaxRedirects bounds the redirects of one URL's fetch; each target's host must be allowed too.
	// Zero: DefaultMaxRedirects; negative: none.
	MaxRedirects int `json:"media-max-redirects"`
	// Transport fetches the URLs; nil: http.DefaultTransport's settings (proxies from the environment).
	Transport http.RoundTripper `json:"-"`
}

// withDefaults fills the zero fields.
func (c MediaConfig) withDefaults() MediaConfig {
	if c.MaxBytes == 0 {
		c.MaxBytes = DefaultMaxImageBytes
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultMediaTimeout
	}
	if c.MaxRedirects == 0 {
		c.MaxRedirects = DefaultMaxRedirects
	}
	if c.MaxRedirects < 0 {
		c.MaxRedirects = 0
	}
	return c
}

// Validate reports a MediaConfig that New refuses.
func (c MediaConfig) Validate() error {
	if c.MaxBytes < 0 || c.Timeout < 0 {
		return fmt.Errorf("gateway: config: negative media limits (max bytes %d, timeout %s)", c.MaxBytes, c.Timeout)
	}
	for _, d := range c.AllowedDomains {
		if d == "" || strings.ContainsAny(d, "/:@ ") && d != "*" {
			return fmt.Errorf("gateway: config: allowed media domain %q: want a host name such as images.example.com, or *", d)
		}
	}
	return nil
}

// media reads the images of image_url parts.
type media struct {
	cfg    MediaConfig
	client *http.Client
}

func newMedia(cfg MediaConfig) *media {
	cfg = cfg.withDefaults()
	m := &media{cfg: cfg}
	tr := cfg.Transport
	if tr == nil {
		tr = http.DefaultTransport
	}
	m.client = &http.Client{Transport: tr, Timeout: cfg.Timeout,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) > cfg.MaxRedirects {
				return fmt.Errorf("more than %d redirects", cfg.MaxRedirects)
			}
			return m.allowed(req.URL)
		}}
	return m
}

// allowed refuses a URL whose scheme is not http(s) or whose host is not allowed.
func (m *media) allowed(u *url.URL) error {
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("scheme %q: only data:, http: and https: URLs", u.Scheme)
	}
	host := strings.ToLower(u.Hostname())
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	for _, d := range m.cfg.AllowedDomains {
		d = strings.ToLower(strings.TrimSuffix(d, "."))
		if d == "*" || host == d || strings.HasSuffix(host, "."+d) {
			return nil
		}
	}
	if len(m.cfg.AllowedDomains) == 0 {
		return errors.New("image URLs are not fetched by this server (start it with --allowed-media-domains); send the image as a data URL (data:image/png;base64,<the bytes>)")
	}
	return fmt.Errorf("host %q is not among the allowed media domains %v", host, m.cfg.AllowedDomains)
}

// read returns the bytes of an image_url: a base64 data URL's, or an allowed http(s) URL's body.
func (m *media) read(ctx context.Context, raw string) ([]byte, error) {
	if strings.HasPrefix(raw, "data:") {
		return m.dataURL(raw)
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("bad URL: %v", err)
	}
	if err := m.allowed(u); err != nil {
		return nil, err
	}
	return m.fetch(ctx, u)
}

// dataURL decodes data:[<media type>][;base64],<data>: base64 only, the media type an image's or none.
func (m *media) dataURL(raw string) ([]byte, error) {
	meta, data, ok := strings.Cut(strings.TrimPrefix(raw, "data:"), ",")
	if !ok {
		return nil, errors.New("data URL without a comma: want data:image/png;base64,<the bytes>")
	}
	params := strings.Split(meta, ";")
	if mt := strings.ToLower(strings.TrimSpace(params[0])); mt != "" && !strings.HasPrefix(mt, "image/") {
		return nil, fmt.Errorf("data URL of media type %q: want an image/*", params[0])
	}
	if !strings.EqualFold(params[len(params)-1], "base64") {
		return nil, errors.New("data URL is not base64: want data:image/png;base64,<the bytes>")
	}
	if n := int64(base64.StdEncoding.DecodedLen(len(data))); n > m.cfg.MaxBytes+3 {
		return nil, fmt.Errorf("image of about %d bytes, more than %d", n, m.cfg.MaxBytes)
	}
	out, err := base64.StdEncoding.DecodeString(data)
	if err != nil {
		// Some clients leave the padding out.
		var err2 error
		if out, err2 = base64.RawStdEncoding.DecodeString(data); err2 != nil {
			return nil, fmt.Errorf("data URL: bad base64: %v", err)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("data URL holds no bytes")
	}
	if int64(len(out)) > m.cfg.MaxBytes {
		return nil, fmt.Errorf("image of %d bytes, more than %d", len(out), m.cfg.MaxBytes)
	}
	return out, nil
}

// fetch GETs an allowed URL, bounded by the client's timeout and redirects and by MaxBytes.
func (m *media) fetch(ctx context.Context, u *url.URL) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("bad URL: %v", err)
	}
	resp, err := m.client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) && ue.Timeout() {
			return nil, fmt.Errorf("fetch %s: no answer within %s", u.Redacted(), m.cfg.Timeout)
		}
		return nil, fmt.Errorf("fetch %s: %v", u.Redacted(), err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetch %s: %s", u.Redacted(), resp.Status)
	}
	if resp.ContentLength > m.cfg.MaxBytes {
		return nil, fmt.Errorf("fetch %s: image of %d bytes, more than %d", u.Redacted(), resp.ContentLength, m.cfg.MaxBytes)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, m.cfg.MaxBytes+1))
	switch {
	case err != nil && ctx.Err() != nil:
		return nil, fmt.Errorf("fetch %s: no complete answer within %s", u.Redacted(), m.cfg.Timeout)
	case err != nil:
		return nil, fmt.Errorf("fetch %s: %v", u.Redacted(), err)
	case int64(len(data)) > m.cfg.MaxBytes:
		return nil, fmt.Errorf("fetch %s: image of more than %d bytes", u.Redacted(), m.cfg.MaxBytes)
	case len(data) == 0:
		return nil, fmt.Errorf("fetch %s: no bytes", u.Redacted())
	}
	return data, nil
}

// contentPart is one part of a message's content array.
type contentPart struct {
	Type     string          `json:"type"`
	Text     *string         `json:"text"`
	ImageURL json.RawMessage `json:"image_url"`
}

// imageURL reads an image_url part's URL: {"url": ..., "detail": ...} (detail ignored) or a string.
func (p contentPart) imageURL() (string, error) {
	var obj struct {
		URL *string `json:"url"`
	}
	if err := json.Unmarshal(p.ImageURL, &obj); err == nil && obj.URL != nil {
		return *obj.URL, nil
	}
	var s string
	if err := json.Unmarshal(p.ImageURL, &s); err == nil {
		return s, nil
	}
	return "", errors.New(`image_url must be {"url": "data:image/png;base64,<the bytes>"}`)
}

// chatImages reads the images of a chat's messages in order and renders each message's content with the
// model's placeholder where its images were: text parts joined with newlines, an image's placeholder
// between the texts around it without a separator (as Llama 4's chat template renders content parts).
// Messages without images keep their content. Nothing is fetched or decoded before every message was
// read and the image count checked.
func (g *Gateway) chatImages(ctx context.Context, m Model, in []chatMessage, msgs []Message) ([][]byte, error) {
	type ref struct {
		msg, part int
		url       string
	}
	var refs []ref
	parts := make([][]contentPart, len(in))
	for i, msg := range in {
		raw := bytes.TrimSpace(msg.Content)
		if len(raw) == 0 || raw[0] != '[' {
			continue
		}
		if err := json.Unmarshal(raw, &parts[i]); err != nil {
			return nil, invalid("messages[%d].content: want a string or an array of content parts", i)
		}
		for j, p := range parts[i] {
			if p.Type != "image_url" {
				continue
			}
			u, err := p.imageURL()
			if err != nil {
				return nil, invalid("messages[%d].content[%d]: %v", i, j, err)
			}
			refs = append(refs, ref{i, j, u})
		}
	}
	if len(refs) == 0 {
		return nil, nil
	}
	if m.ImagePlaceholder == "" {
		if m.NoImages != "" {
			return nil, invalid("messages: %d images: %s", len(refs), m.NoImages)
		}
		return nil, invalid("messages: %d images for model %s, which takes no images", len(refs), m.Name)
	}
	if m.MaxImages > 0 && len(refs) > m.MaxImages {
		return nil, invalid("messages: %d images, at most %d per request", len(refs), m.MaxImages)
	}
	images := make([][]byte, len(refs))
	for k, r := range refs {
		data, err := g.media.read(ctx, r.url)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, invalid("messages[%d].content[%d].image_url: %v", r.msg, r.part, err)
		}
		images[k] = data
	}
	for i, ps := range parts {
		has := false
		for _, p := range ps {
			has = has || p.Type == "image_url"
		}
		if !has {
			continue
		}
		var b strings.Builder
		text := false // the previous part was text
		for _, p := range ps {
			if p.Type == "image_url" {
				b.WriteString(m.ImagePlaceholder)
				text = false
				continue
			}
			if text {
				b.WriteByte('\n')
			}
			b.WriteString(*p.Text) // messageContent checked the text parts
			text = true
		}
		msgs[i].Content = b.String()
	}
	return images, nil
}

// AddFlags binds c's fields to flags in fs (--allowed-media-domains, --media-max-bytes,
// --media-timeout, --media-max-redirects), with c's current values as defaults.
func (c *MediaConfig) AddFlags(fs *flag.FlagSet) {
	fs.Func("allowed-media-domains", `comma-separated hosts whose http(s) image URLs chat requests may name, subdomains included ("*": any; empty: only data URLs)`, func(v string) error {
		for _, d := range strings.Split(v, ",") {
			if d = strings.TrimSpace(d); d != "" {
				c.AllowedDomains = append(c.AllowedDomains, d)
			}
		}
		return nil
	})
	fs.Int64Var(&c.MaxBytes, "media-max-bytes", c.MaxBytes, "largest image a chat request may send or name, in bytes (0: 20 MiB)")
	fs.DurationVar(&c.Timeout, "media-timeout", c.Timeout, "deadline of one image URL's fetch (0: 10s)")
	fs.IntVar(&c.MaxRedirects, "media-max-redirects", c.MaxRedirects, "redirects one image URL's fetch may follow (0: 3; negative: none)")
}

// hasImages reports whether any message has an image_url part.
func hasImages(in []chatMessage) bool {
	for _, msg := range in {
		raw := bytes.TrimSpace(msg.Content)
		if len(raw) == 0 || raw[0] != '[' {
			continue
		}
		var parts []contentPart
		if json.Unmarshal(raw, &parts) != nil {
			continue
		}
		for _, p := range parts {
			if p.Type == "image_url" {
				return true
			}
		}
	}
	return false
}
