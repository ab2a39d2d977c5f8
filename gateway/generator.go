package gateway

import (
	"context"
	"encoding/json"
	"errors"
)

// Generator is what the gateway serves: one model's generations. The coordinator implements it over its
// queue and batches; tests implement it with a fake. Its methods are called concurrently, from the
// goroutines of the HTTP requests.
//
// Errors tell the gateway how to answer: one that wraps a kind sentinel (ErrInvalidRequest,
// ErrNotFound, ErrOverloaded, ErrUnavailable; an *Error gives the kind and the error body's code) is
// answered with the kind's status; any other is a 500. The error's text is the message the client
// reads, as it is.
type Generator interface {
	// Model describes the served model named name; empty names the served model. An unknown name is
	// an ErrNotFound error.
	Model(name string) (Model, error)
	// Tokenizer returns the served model's tokenizer, or the error to answer text requests with when
	// it has none (an ErrInvalidRequest error).
	Tokenizer() (Tokenizer, error)
	// Serving returns nil while generations are served, else why not (an ErrUnavailable error, say):
	// /health answers it.
	Serving() error
	// Generate checks req and starts its generation; it does not wait for the first token. The caller
	// must Close the Stream. ctx bounds the call, not the generation: Stream.Next takes its own.
	Generate(ctx context.Context, req Request) (Stream, error)
}

// Stream is one generation's output, read by one goroutine.
type Stream interface {
	// PromptIDs is the prompt as the model sees it (a text prompt encoded). The caller must not
	// modify it.
	PromptIDs() []int
	// Next blocks until the generation has new tokens or ends, or ctx ends. The last chunk has Finish
	// set; Next must not be called after it, nor after an error. An error is ctx's, or the
	// generation's failure, returned with the chunk of the tokens that came just before it (if any).
	Next(ctx context.Context) (Chunk, error)
	// Close ends the generation if it still runs and releases it; it is idempotent.
	Close()
}

// Tokenizer is the served model's tokenizer, as the gateway uses it.
type Tokenizer interface {
	// Encode turns text into ids, with the special tokens (BOS) when addSpecial is set.
	Encode(text string, addSpecial bool) []int
	// EncodeChat renders msgs with the model's chat template, with the assistant's header after them
	// when addGenerationPrompt is set, and encodes the result;
	// tools (OpenAI's tool objects, nil for none) are the template's tools variable.
	EncodeChat(msgs []Message, tools []json.RawMessage, addGenerationPrompt bool) ([]int, error)
	// Decode turns ids into text, special tokens left out (echo of a prompt of ids).
	Decode(ids []int) (string, error)
	// DecodeSpecial is Decode with special tokens kept: a token as logprobs show it (decode([id])),
	// and /detokenize.
	DecodeSpecial(ids []int) (string, error)
	// Token is a token's string in the vocabulary (/tokenize's token_strs); false for an unknown id.
	Token(id int) (string, bool)
}

// Model describes the served model.
type Model struct {
	// Name is the model's id in the API.
	Name string
	// MaxModelLen is the context: prompt and new tokens together (max_position_embeddings).
	MaxModelLen int
	// ImagePlaceholder is the text that stands for one image in a prompt ("<|image|>" for Llama 4);
	// empty when the model takes no images, and NoImages then says why. MaxImages bounds the images of
	// one request (0: no bound here; the Generator checks).
	ImagePlaceholder string
	NoImages         string
	MaxImages        int
}

// Message is one turn of a chat: an assistant's may carry tool calls, a tool's the id of the call it
// answers.
type Message struct {
	Role       string
	Content    string
	ToolCalls  []ToolCall
	ToolCallID string
}

// Request is one generation.
type Request struct {
	// Model names the model; empty means the served one.
	Model string
	// Prompt is the prompt as text, which the Generator encodes with BOS; PromptIDs is it as ids.
	// The Generator refuses a request with both or neither.
	Prompt    string
	PromptIDs []int
	// MaxTokens bounds the new tokens; the Generator refuses one that is not positive or that does
	// not fit the context with the prompt.
	MaxTokens int
	// Sampling chooses the tokens; a field left nil takes the model's default.
	Sampling Sampling
	// IgnoreEOS keeps generating past the model's eos ids.
	IgnoreEOS bool
	// StopIDs end the generation too, besides the eos ids.
	StopIDs []int
	// Stop strings end the generation too, matched on the decoded text as vLLM matches them: the text
	// ends before the stop string (after it with IncludeStopStr) and the finish is FinishStop. A stream
	// holds back text that could still become a stop string. They need the model's tokenizer.
	Stop           []string
	IncludeStopStr bool
	// Logprobs asks for each new token's log-probability and the TopLogprobs (at most 20) most likely
	// tokens' (Chunk.Logprobs), of the model's own distribution as vLLM gives them.
	Logprobs    bool
	TopLogprobs int
	// PromptLogprobs, when not nil, asks for the log-probabilities of the prompt's tokens (vLLM's
	// prompt_logprobs) with this many (at most 20) most likely tokens each, of the model's own
	// distribution as Logprobs are: they come with the first chunk (Chunk.PromptLogprobs).
	PromptLogprobs *int
	// Images are the encoded images (PNG, JPEG, GIF, WebP) of the prompt's image placeholders, in order
	// (a chat's image_url parts); the Generator decodes and checks them.
	Images [][]byte
}

// Sampling is a request's sampling parameters; nil fields take the model's defaults
// (generation_config.json, greedy when it does not sample).
type Sampling struct {
	Temperature *float64
	TopP        *float64
	TopK        *int // 0 is off
	Seed        *uint64

	// MinTokens holds back the eos and stop ids (and stop strings) until this many tokens came.
	MinTokens int
	// LogitBias is added to the logits of its ids.
	LogitBias map[int]float64
	// Penalties as vLLM applies them; 0 is off (and so is a RepetitionPenalty of 1).
	RepetitionPenalty, FrequencyPenalty, PresencePenalty float64
}

// Chunk is a piece of a generation's output.
type Chunk struct {
	// IDs are the new tokens (usually one).
	IDs []int
	// Text is the text that IDs complete: whole characters only, special tokens left out, and with
	// the last chunk what is left of an unfinished character; "" when the model has no tokenizer.
	Text string
	// Finish is set on the last chunk: FinishStop or FinishLength.
	Finish string
	// StopReason is the stop string that ended the generation, on the last chunk.
	StopReason string
	// Logprobs has one entry per id of IDs when the request asked for logprobs, else none.
	Logprobs []TokenLogprobs
	// PromptLogprobs are set on the first chunk when the request asked for them: entry i is prompt
	// token i+1's log-probability given the tokens before it (the first prompt token has none).
	PromptLogprobs []TokenLogprobs
}

// TokenLogprobs are a chosen token's log-probability and the most likely tokens' (highest first).
type TokenLogprobs struct {
	Logprob float32
	Top     []TokenLogprob
	// Rank is the token's rank (1: the most likely), given for a prompt's tokens (0: not given).
	Rank int
}

// TokenLogprob is a token id and its log-probability.
type TokenLogprob struct {
	ID      int
	Logprob float32
}

// Finish reasons.
const (
	FinishStop   = "stop"   // an eos or stop id was chosen (it is the last id), or a stop string completed
	FinishLength = "length" // max_tokens ids were chosen
)

// Kinds of errors, tested with errors.Is: a Generator's error that wraps one is answered with its
// status. The gateway's own checks return ErrInvalidRequest errors.
var (
	// ErrInvalidRequest is 400, code invalid_request: the request will not succeed as sent.
	ErrInvalidRequest = errors.New("gateway: invalid request")
	// ErrNotFound is 404, code not_found: an unknown model (code model_not_found from a Generator).
	ErrNotFound = errors.New("gateway: not found")
	// ErrOverloaded is 429, code overloaded: try again later (a full queue).
	ErrOverloaded = errors.New("gateway: overloaded")
	// ErrUnavailable is 503, code unavailable: this server does not serve now.
	ErrUnavailable = errors.New("gateway: unavailable")
)

// Error is a Generator's error with how to answer it: Kind is one of the kind sentinels (nil: a
// server error, 500), Code the error body's code (empty: the kind's). Its text is Err's.
type Error struct {
	Kind error
	Code string
	Err  error
}

func (e *Error) Error() string { return e.Err.Error() }

// Unwrap returns Kind and Err, so errors.Is finds both.
func (e *Error) Unwrap() []error {
	if e.Kind == nil {
		return []error{e.Err}
	}
	return []error{e.Kind, e.Err}
}
