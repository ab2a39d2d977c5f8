package gateway

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/internal/security"
)

// Limits of the HTTP gateway.
const (
	// maxRequestBytes bounds a request body: a prompt of a few million token ids.
	maxRequestBytes = 64 << 20
	// bodyReadTimeout bounds the read of a request body; the response (a stream that may last as long
	// as the generation) has no deadline.
	bodyReadTimeout = 30 * time.Second
	// headerReadTimeout bounds the read of a request's headers.
	headerReadTimeout = 10 * time.Second
	// idleTimeout closes a keep-alive connection that carries no request for this long.
	idleTimeout = 2 * time.Minute
)

// Config configures a Gateway.
type Config struct {
	// Generator serves the generations; required.
	Generator Generator
	// Logger logs refused and failed requests (debug and warn); nil means none.
	Logger *zap.Logger
	// AllowedOrigins are the origins whose browser requests the CORS headers allow ("*": any); empty
	// means no CORS headers.
	AllowedOrigins []string
	// APIKeys, when not empty, are the bearer tokens every /v1 route accepts; a request without one of
	// them is refused with 401, as vLLM's --api-key (which may be given several times); /health stays
	// open. They are compared in constant time.
	APIKeys []string
	// Media says which image URLs chat requests may name (data URLs always; http(s) only from allowed
	// domains, bounded); the zero value refuses http(s) URLs.
	Media MediaConfig
}

// Validate reports a Config that New refuses.
func (c Config) Validate() error {
	if c.Generator == nil {
		return errors.New("gateway: config: no Generator")
	}
	return c.Media.Validate()
}

// Gateway is the OpenAI-compatible HTTP API over a Generator, an http.Handler. Make one with New.
type Gateway struct {
	gen     Generator
	log     *zap.Logger
	created int64 // unix seconds: when the gateway was made, the model object's "created"
	mux     *http.ServeMux
	origins []string
	keys    security.Tokens
	media   *media
}

// New returns the gateway of cfg.Generator.
func New(cfg Config) (*Gateway, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	g := &Gateway{gen: cfg.Generator, log: cfg.Logger, created: time.Now().Unix(), mux: http.NewServeMux(),
		origins: cfg.AllowedOrigins, keys: security.NewTokens(cfg.APIKeys...), media: newMedia(cfg.Media)}
	if g.log == nil {
		g.log = zap.NewNop()
	}
	g.mux.HandleFunc("/v1/models", allow(g.models, http.MethodGet, http.MethodHead))
	g.mux.HandleFunc("/v1/models/{model...}", allow(g.model, http.MethodGet, http.MethodHead))
	g.mux.HandleFunc("/v1/completions", allow(g.generation(kindCompletion), http.MethodPost))
	g.mux.HandleFunc("/v1/chat/completions", allow(g.generation(kindChat), http.MethodPost))
	g.mux.HandleFunc("/tokenize", allow(g.tokenize, http.MethodPost))
	g.mux.HandleFunc("/detokenize", allow(g.detokenize, http.MethodPost))
	g.mux.HandleFunc("/health", allow(g.health, http.MethodGet, http.MethodHead))
	g.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		g.fail(w, &httpError{http.StatusNotFound, "not_found", fmt.Errorf(
			"no route %s %s: the gateway serves /v1/models, /v1/completions, /v1/chat/completions, /tokenize, /detokenize and /health", r.Method, r.URL.Path)})
	})
	return g, nil
}

// ServeHTTP serves the gateway's routes, with CORS headers for the allowed origins and the API key's
// check on /v1 routes.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if origin := r.Header.Get("Origin"); origin != "" && g.allowed(origin) {
		h := w.Header()
		h.Set("Access-Control-Allow-Origin", origin)
		h.Add("Vary", "Origin")
		if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" { // a preflight
			h.Set("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
			h.Set("Access-Control-Allow-Headers", "Authorization, Content-Type")
			w.WriteHeader(http.StatusNoContent)
			return
		}
	}
	if g.keys.Len() > 0 && strings.HasPrefix(r.URL.Path, "/v1") && !g.keys.Valid(security.BearerToken(r.Header.Get("Authorization"))) {
		g.fail(w, &httpError{http.StatusUnauthorized, "unauthorized", errors.New("missing or wrong API key: send Authorization: Bearer KEY")})
		return
	}
	g.mux.ServeHTTP(w, r)
}

// allowed reports whether CORS allows origin.
func (g *Gateway) allowed(origin string) bool {
	for _, o := range g.origins {
		if o == "*" || o == origin {
			return true
		}
	}
	return false
}

// NewServer returns an http.Server of the gateway. It has no write timeout, as a streamed response
// lasts as long as its generation, and no server-wide read timeout, which would cancel the requests of
// streams that outlast it; the body's read is bounded per request instead.
func (g *Gateway) NewServer() *http.Server {
	return &http.Server{
		Handler:           g,
		ReadHeaderTimeout: headerReadTimeout,
		IdleTimeout:       idleTimeout,
		ErrorLog:          zap.NewStdLog(g.log.Named("http")),
	}
}

// OpenAI error types, the "type" of an error body.
const (
	errTypeInvalid     = "invalid_request_error" // 4xx but 429: the request will not succeed as sent
	errTypeRateLimit   = "rate_limit_error"      // 429: try again later
	errTypeServer      = "server_error"          // 5xx
	errTypeUnavailable = "service_unavailable"   // 503: this server does not serve now
)

// kindTable maps the kinds of errors to HTTP status codes, OpenAI error types and default codes; an
// *Error's Code replaces the default. Errors of no kind are 500 internal_error.
var kindTable = []struct {
	kind   error
	status int
	typ    string
	code   string
}{
	{ErrInvalidRequest, http.StatusBadRequest, errTypeInvalid, "invalid_request"},
	{ErrNotFound, http.StatusNotFound, errTypeInvalid, "not_found"},
	{ErrOverloaded, http.StatusTooManyRequests, errTypeRateLimit, "overloaded"},
	{ErrUnavailable, http.StatusServiceUnavailable, errTypeUnavailable, "unavailable"},
}

// httpError is an error of the gateway's own answered with a status that no kind has: an unknown
// route, a method not allowed, a body too large.
type httpError struct {
	status int
	code   string
	err    error
}

func (e *httpError) Error() string { return e.err.Error() }
func (e *httpError) Unwrap() error { return e.err }

// invalid makes an ErrInvalidRequest error.
func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidRequest, fmt.Sprintf(format, args...))
}

// ErrorBody is OpenAI's error response: {"error": {"message", "type", "param", "code"}}.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail is an error response's content.
type ErrorDetail struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"` // always null: messages name the field
	Code    string  `json:"code"`
}

// toHTTP returns the status and body that err is answered with. The message is err's text.
func toHTTP(err error) (int, ErrorBody) {
	status, typ, code := http.StatusInternalServerError, errTypeServer, "internal_error"
	var he *httpError
	if errors.As(err, &he) {
		status, code = he.status, he.code
		typ = errTypeInvalid
		if status >= 500 {
			typ = errTypeServer
		}
	} else {
		for _, k := range kindTable {
			if errors.Is(err, k.kind) {
				status, typ, code = k.status, k.typ, k.code
				break
			}
		}
		if ge := (*Error)(nil); errors.As(err, &ge) && ge.Code != "" {
			code = ge.Code
		}
	}
	return status, ErrorBody{ErrorDetail{Message: err.Error(), Type: typ, Code: code}}
}

// allow wraps h to answer 405 to other methods than the ones given.
func allow(h http.HandlerFunc, methods ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		for _, m := range methods {
			if r.Method == m {
				h(w, r)
				return
			}
		}
		w.Header().Set("Allow", strings.Join(methods, ", "))
		status, body := toHTTP(&httpError{http.StatusMethodNotAllowed, "method_not_allowed",
			fmt.Errorf("method %s not allowed on %s: use %s", r.Method, r.URL.Path, strings.Join(methods, " or "))})
		writeJSON(w, status, body)
	}
}

// fail answers err as an OpenAI error.
func (g *Gateway) fail(w http.ResponseWriter, err error) {
	status, body := toHTTP(err)
	if status >= 500 && status != http.StatusServiceUnavailable {
		g.log.Warn("http request failed", zap.Int("status", status), zap.Error(err))
	} else {
		g.log.Debug("http request refused", zap.Int("status", status), zap.Error(err))
	}
	writeJSON(w, status, body)
}

// writeJSON writes v as a JSON response with status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v) // a client that went away gets nothing more
}

// ModelCard is an OpenAI model object, with vLLM's max_model_len.
type ModelCard struct {
	ID          string `json:"id"`
	Object      string `json:"object"`
	Created     int64  `json:"created"`
	OwnedBy     string `json:"owned_by"`
	MaxModelLen int    `json:"max_model_len"`
}

// ModelList is the response of GET /v1/models.
type ModelList struct {
	Object string      `json:"object"`
	Data   []ModelCard `json:"data"`
}

func (g *Gateway) card(m Model) ModelCard {
	return ModelCard{ID: m.Name, Object: "model", Created: g.created, OwnedBy: "tpfleet", MaxModelLen: m.MaxModelLen}
}

// models answers GET /v1/models: the served model.
func (g *Gateway) models(w http.ResponseWriter, r *http.Request) {
	m, err := g.gen.Model("")
	if err != nil {
		g.fail(w, err)
		return
	}
	writeJSON(w, http.StatusOK, ModelList{Object: "list", Data: []ModelCard{g.card(m)}})
}

// model answers GET /v1/models/{model}.
func (g *Gateway) model(w http.ResponseWriter, r *http.Request) {
	m, err := g.gen.Model(r.PathValue("model"))
	if err != nil {
		g.fail(w, err)
		return
	}
	writeJSON(w, http.StatusOK, g.card(m))
}

// health answers GET /health: 200 (empty body) while the Generator serves, else its reason (503 for an
// ErrUnavailable), so a load balancer sends requests to the servers that serve.
func (g *Gateway) health(w http.ResponseWriter, r *http.Request) {
	if err := g.gen.Serving(); err != nil {
		g.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}
