// Package gateway is tpfleet's OpenAI-compatible HTTP API, as vLLM serves it, over a small generation
// interface of plain Go types (Generator): it owns the JSON, the validation of OpenAI's fields and
// Server-Sent Events, and nothing of how tokens are made.
//
// # Routes
//
//   - GET /v1/models lists the served model (Generator.Model); GET /v1/models/{model} describes it.
//   - POST /v1/completions takes a prompt (a string, which the Generator encodes with BOS, or an array
//     of token ids, or a one-element array of either) and POST /v1/chat/completions takes messages,
//     rendered with the model's chat template and a generation prompt (Tokenizer.EncodeChat). Both take
//     max_tokens (left out: the rest of the context), temperature, top_p, seed, stop (a string or up to
//     4 strings, matched on the decoded text as vLLM does: the text ends before the stop string and
//     finish_reason is "stop", stop_reason names it) and vLLM's top_k, stop_token_ids, ignore_eos,
//     include_stop_str_in_output and return_token_ids; sampling fields left out take the model's
//     defaults. n asks for up to 128 choices of one prompt: each is its own generation, seeded with the
//     request's seed + its index as vLLM seeds them (a random seed each without one); streamed, their
//     events interleave, each with its choice's index. echo (completions) puts the prompt's text before
//     each choice's. presence_penalty, frequency_penalty, vLLM's repetition_penalty and min_tokens, and
//     logit_bias (clamped to [-100, 100]) go to the Generator. logprobs (completions: an integer up to
//     20; chat: logprobs true and top_logprobs up to 20) add each token's log-probability of the raw
//     model distribution in the endpoint's format, as vLLM writes them (a token is decode([id]) with
//     special tokens kept, "token_id:N" without a tokenizer); with echo, completions' logprobs cover the
//     prompt's tokens first (Request.PromptLogprobs, the prompt's first token with null logprob and
//     top_logprobs), text_offset counting from the echoed prompt's start, and a stream sends them in its
//     first event with the echoed text (vLLM's later events count offsets from the generated text only;
//     ours go on from the prompt's). vLLM's prompt_logprobs (up to 20) gives the prompt's logprobs in
//     vLLM's format in whole responses (a completion choice's, a chat response's prompt_logprobs: null
//     for the first token, then token ids to logprob, rank and decoded_token; a whole echo with
//     logprobs has them too; a stream has none, and refuses prompt_logprobs above 0, as vLLM's). Chat tools are rendered by the model's
//     chat template (with the assistants' tool_calls, their arguments parsed from JSON, and role tool
//     turns); with tool_choice "auto" (the default) the output is parsed for Llama 4's JSON tool calls
//     ({"name", "parameters"}, as vLLM's llama3_json parser reads them) and answered as tool_calls with
//     finish_reason "tool_calls" (streamed: text that may be a call is held to the end, then sent as
//     one tool_calls delta or as text); "none" leaves the output text. response_format other than
//     {"type": "text"} and tool_choice "required" or a named function (both need constrained decoding,
//     not built yet) are refused (400), never ignored. A chat message's
//     image_url parts (media.go) are read when the model takes images (Model.ImagePlaceholder): base64
//     data URLs always, http(s) URLs only from MediaConfig.AllowedDomains, fetched within its bounds of
//     bytes, time and redirects; the placeholder takes each part's place in the rendered content and the
//     bytes go to the Generator (Request.Images), which decodes and checks them. With stream they answer Server-Sent Events in OpenAI's chunk format, one event per
//     Chunk the Generator hands over (usually one token; text that could still become a stop string is
//     held back until it cannot), flushed at once, then "data: [DONE]"; a
//     failure after the first event comes as an error event before the end.
//   - POST /tokenize and POST /detokenize, as vLLM serves them: a prompt (add_special_tokens, default
//     true) or a chat's messages (add_generation_prompt, default true) to count, max_model_len, tokens
//     (and token_strs with return_token_strs); tokens to prompt, the text with special tokens kept.
//   - GET /health answers 200 while Generator.Serving is nil, else its error (503 for an
//     ErrUnavailable one).
//
// # Errors
//
// Errors are OpenAI error bodies ({"error": {"message", "type", "param", "code"}}, ErrorBody). The
// gateway's own checks (malformed JSON, unsupported OpenAI fields, unknown routes and methods, a body
// over 64 MiB) answer 400, 404, 405 or 413. A Generator's error is answered by its kind (see
// Generator): ErrInvalidRequest 400, ErrNotFound 404, ErrOverloaded 429, ErrUnavailable 503, other
// errors 500; an *Error names the body's code. Messages are the errors' text as it is, so a Generator's
// checks read the same through HTTP as through its other APIs.
//
// A client that goes away cancels its request: the request's context ends, Stream.Next returns, and
// the gateway closes the Stream.
//
// # Usage
//
//	g, err := gateway.New(gateway.Config{Generator: gen, Logger: log})
//	if err != nil { ... }
//	srv := g.NewServer() // no write timeout: a stream lasts as long as its generation
//	go srv.Serve(lis)
//	defer srv.Shutdown(ctx)
//
// The coordinator serves it at its Config.HTTPAddr (package coordinator implements Generator over its
// queue and batches).
//
// The package imports zap and the standard library only: not the generated protobuf code, not the
// coordinator, no backend and no cgo, so a Generator over any engine can serve it.
package gateway
