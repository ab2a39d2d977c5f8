package gateway

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"image"
	"image/png"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

// pngBytes is a small PNG.
func pngBytes(t *testing.T, w, h int) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := png.Encode(&b, image.NewGray(image.Rect(0, 0, w, h))); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// serveMedia starts a gateway of f with media settings m.
func serveMedia(t *testing.T, f *fakeGen, m MediaConfig) string {
	t.Helper()
	g, err := New(Config{Generator: f, Media: m})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	return srv.URL
}

// imageChat is a chat body whose one user message has the given content parts (JSON).
func imageChat(parts ...string) string {
	return `{"max_tokens":2,"messages":[{"role":"user","content":[` + strings.Join(parts, ",") + `]}]}`
}

func imagePart(u string) string {
	return fmt.Sprintf(`{"type":"image_url","image_url":{"url":%q,"detail":"high"}}`, u)
}

// TestChatImages: image_url parts with data URLs reach the Generator as bytes, their placeholders in the
// rendered content where the parts were; bad ones are 400s that name the part and the problem, and no
// image is read for a model that takes none or for more images than it allows.
func TestChatImages(t *testing.T) {
	img := pngBytes(t, 3, 2)
	data := "data:image/png;base64," + base64.StdEncoding.EncodeToString(img)
	f := &fakeGen{tok: true, images: 2}
	base := serveMedia(t, f, MediaConfig{})
	body := imageChat(imagePart(data), `{"type":"text","text":"What is it?"}`, `{"type":"text","text":"Be brief."}`, imagePart(data))
	code, _, out := call(t, http.MethodPost, base+"/v1/chat/completions", body)
	if code != http.StatusOK {
		t.Fatalf("POST image chat = %d %s", code, out)
	}
	f.mu.Lock()
	last := f.last
	f.mu.Unlock()
	if len(last.Images) != 2 || !bytes.Equal(last.Images[0], img) || !bytes.Equal(last.Images[1], img) {
		t.Errorf("Generate got %d images, want 2 copies of the %d PNG bytes", len(last.Images), len(img))
	}
	prompt, _ := fakeTok{}.Decode(last.PromptIDs)
	if want := "user: <|image|>What is it?\nBe brief.<|image|>\n"; !strings.HasPrefix(prompt, want) {
		t.Errorf("rendered prompt %q, want it to start with %q", prompt, want)
	}
	// /tokenize counts text only.
	code, _, out = call(t, http.MethodPost, base+"/tokenize", `{"messages":[{"role":"user","content":[`+imagePart(data)+`]}]}`)
	if code != http.StatusBadRequest || !strings.Contains(string(out), "/tokenize takes text content only") {
		t.Errorf("POST /tokenize with an image part = %d %s, want 400", code, out)
	}
	// Unpadded base64, as some clients send it.
	unpadded := "data:image/png;base64," + base64.RawStdEncoding.EncodeToString(img)
	if code, _, out := call(t, http.MethodPost, base+"/v1/chat/completions", imageChat(imagePart(unpadded))); code != http.StatusOK {
		t.Errorf("unpadded base64: %d %s", code, out)
	}

	big := MediaConfig{MaxBytes: 16}
	for _, tc := range []struct {
		name  string
		f     *fakeGen
		media MediaConfig
		body  string
		msg   string
	}{
		{"bad base64", f, MediaConfig{}, imageChat(imagePart("data:image/png;base64,@@@not base64@@@")), "messages[0].content[0].image_url: data URL: bad base64"},
		{"not base64", f, MediaConfig{}, imageChat(imagePart("data:image/png,rawbytes")), "data URL is not base64"},
		{"no comma", f, MediaConfig{}, imageChat(imagePart("data:image/png;base64")), "data URL without a comma"},
		{"not an image type", f, MediaConfig{}, imageChat(imagePart("data:text/plain;base64,aGk=")), `media type "text/plain"`},
		{"empty data URL", f, MediaConfig{}, imageChat(imagePart("data:image/png;base64,")), "data URL holds no bytes"},
		{"too many bytes", f, big, imageChat(imagePart(data)), "more than 16"},
		{"http refused", f, MediaConfig{}, imageChat(imagePart("https://example.com/cat.png")), "image URLs are not fetched by this server (start it with --allowed-media-domains)"},
		{"file scheme", f, MediaConfig{AllowedDomains: []string{"*"}}, imageChat(imagePart("file:///etc/passwd")), `scheme "file"`},
		{"image_url object", f, MediaConfig{}, imageChat(`{"type":"image_url","image_url":{"uri":"x"}}`), `image_url must be {"url"`},
		{"too many images", f, MediaConfig{}, imageChat(imagePart(data), imagePart(data), imagePart(data)), "3 images, at most 2 per request"},
		{"no vision", &fakeGen{tok: true}, MediaConfig{}, imageChat(imagePart(data)), "model fake, which takes no images"},
	} {
		base := serveMedia(t, tc.f, tc.media)
		code, _, out := call(t, http.MethodPost, base+"/v1/chat/completions", tc.body)
		if body := decode[ErrorBody](t, out); code != http.StatusBadRequest || body.Error.Code != "invalid_request" || !strings.Contains(body.Error.Message, tc.msg) {
			t.Errorf("%s: POST /v1/chat/completions = %d %s, want 400 invalid_request with %q", tc.name, code, out, tc.msg)
		}
	}
}

// TestChatImageURLs: with --allowed-media-domains the gateway fetches http(s) image URLs of those hosts
// only, and refuses one too big, too slow, with too many redirects or redirected to another host.
func TestChatImageURLs(t *testing.T) {
	img := pngBytes(t, 4, 4)
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	mux := http.NewServeMux()
	mux.HandleFunc("/ok.png", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write(img) })
	mux.HandleFunc("/big.png", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", "4096")
		_, _ = w.Write(make([]byte, 4096))
	})
	mux.HandleFunc("/big-chunked.png", func(w http.ResponseWriter, _ *http.Request) {
		for range 8 { // no Content-Length: the limit applies while reading
			_, _ = w.Write(make([]byte, 512))
			w.(http.Flusher).Flush()
		}
	})
	mux.HandleFunc("/slow.png", func(w http.ResponseWriter, r *http.Request) {
		select { // answers only when the fetch gave up (or the test ends)
		case <-r.Context().Done():
		case <-release:
		}
	})
	mux.HandleFunc("/missing.png", http.NotFound)
	mux.HandleFunc("/hop/{n}", func(w http.ResponseWriter, r *http.Request) {
		var n int
		fmt.Sscan(r.PathValue("n"), &n)
		to := "/ok.png"
		if n > 0 {
			to = fmt.Sprintf("/hop/%d", n-1)
		}
		http.Redirect(w, r, to, http.StatusFound)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL)
	mux.HandleFunc("/elsewhere", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://localhost:"+u.Port()+"/ok.png", http.StatusFound)
	})

	f := &fakeGen{tok: true, images: 4}
	base := serveMedia(t, f, MediaConfig{AllowedDomains: []string{"127.0.0.1"}, MaxBytes: 1024, Timeout: 300 * time.Millisecond, MaxRedirects: 2})
	for _, path := range []string{"/ok.png", "/hop/1"} {
		code, _, out := call(t, http.MethodPost, base+"/v1/chat/completions", imageChat(imagePart(srv.URL+path)))
		f.mu.Lock()
		got := f.last.Images
		f.mu.Unlock()
		if code != http.StatusOK || len(got) != 1 || !bytes.Equal(got[0], img) {
			t.Errorf("%s: POST = %d %s with %d images, want 200 and the PNG", path, code, out, len(got))
		}
	}
	for _, tc := range []struct{ name, url, msg string }{
		{"too big", srv.URL + "/big.png", "image of 4096 bytes, more than 1024"},
		{"too big, chunked", srv.URL + "/big-chunked.png", "image of more than 1024 bytes"},
		{"too slow", srv.URL + "/slow.png", "within 300ms"},
		{"not found", srv.URL + "/missing.png", "404 Not Found"},
		{"too many redirects", srv.URL + "/hop/2", "more than 2 redirects"},
		{"redirect elsewhere", srv.URL + "/elsewhere", `host "localhost" is not among the allowed media domains [127.0.0.1]`},
		{"disallowed domain", "http://localhost:" + u.Port() + "/ok.png", `host "localhost" is not among the allowed media domains`},
	} {
		code, _, out := call(t, http.MethodPost, base+"/v1/chat/completions", imageChat(imagePart(tc.url)))
		if body := decode[ErrorBody](t, out); code != http.StatusBadRequest || !strings.Contains(body.Error.Message, tc.msg) {
			t.Errorf("%s: POST = %d %s, want 400 with %q", tc.name, code, out, tc.msg)
		}
	}
}

// TestMediaConfig: bad domains and limits are refused.
func TestMediaConfig(t *testing.T) {
	for _, m := range []MediaConfig{{AllowedDomains: []string{"http://x.com"}}, {AllowedDomains: []string{""}}, {MaxBytes: -1}} {
		if _, err := New(Config{Generator: &fakeGen{}, Media: m}); err == nil {
			t.Errorf("New with media %+v: no error", m)
		}
	}
	for _, d := range []string{"*", "images.example.com", "127.0.0.1"} {
		if err := (MediaConfig{AllowedDomains: []string{d}}).Validate(); err != nil {
			t.Errorf("Validate(%q) = %v", d, err)
		}
	}
}
