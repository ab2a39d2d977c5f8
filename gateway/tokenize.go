package gateway

import (
	"encoding/json"
	"fmt"
	"net/http"
)

// tokenizeRequest is the body of POST /tokenize, as vLLM takes it: a completion's prompt, or a chat's
// messages rendered with the chat template.
type tokenizeRequest struct {
	Model               string            `json:"model"`
	Prompt              *string           `json:"prompt"`
	Messages            []chatMessage     `json:"messages"`
	Tools               []json.RawMessage `json:"tools"`
	AddSpecialTokens    *bool             `json:"add_special_tokens"`    // default: true for a prompt, false for messages
	AddGenerationPrompt *bool             `json:"add_generation_prompt"` // messages; default true
	ReturnTokenStrs     bool              `json:"return_token_strs"`
}

// TokenizeResponse is the response of POST /tokenize.
type TokenizeResponse struct {
	Count       int      `json:"count"`
	MaxModelLen int      `json:"max_model_len"`
	Tokens      []int    `json:"tokens"`
	TokenStrs   []string `json:"token_strs"` // null unless return_token_strs
}

// detokenizeRequest is the body of POST /detokenize.
type detokenizeRequest struct {
	Model  string  `json:"model"`
	Tokens []int64 `json:"tokens"`
}

// DetokenizeResponse is the response of POST /detokenize.
type DetokenizeResponse struct {
	Prompt string `json:"prompt"`
}

// tokenize answers POST /tokenize: the ids of a prompt (BOS added unless add_special_tokens is false)
// or of a chat (the template's text, with the generation prompt unless add_generation_prompt is false).
func (g *Gateway) tokenize(w http.ResponseWriter, r *http.Request) {
	var b tokenizeRequest
	if err := decodeBody(w, r, &b); err != nil {
		g.fail(w, err)
		return
	}
	m, err := g.gen.Model(b.Model)
	if err != nil {
		g.fail(w, err)
		return
	}
	tok, err := g.gen.Tokenizer()
	if err != nil {
		g.fail(w, err)
		return
	}
	var ids []int
	switch {
	case (b.Prompt == nil) == (b.Messages == nil):
		g.fail(w, invalid("send prompt or messages, not both or neither"))
		return
	case b.Prompt != nil:
		ids = tok.Encode(*b.Prompt, b.AddSpecialTokens == nil || *b.AddSpecialTokens)
	default:
		msgs, err := messages(b.Messages)
		if err != nil {
			g.fail(w, err)
			return
		}
		if hasImages(b.Messages) {
			g.fail(w, invalid("messages: /tokenize takes text content only; image_url parts are expanded when a chat is generated"))
			return
		}
		tools, _, err := readTools(b.Tools, nil)
		if err != nil {
			g.fail(w, err)
			return
		}
		if ids, err = tok.EncodeChat(msgs, tools, b.AddGenerationPrompt == nil || *b.AddGenerationPrompt); err != nil {
			g.fail(w, fmt.Errorf("%w: messages: %w", ErrInvalidRequest, err))
			return
		}
	}
	resp := TokenizeResponse{Count: len(ids), MaxModelLen: m.MaxModelLen, Tokens: ids}
	if resp.Tokens == nil {
		resp.Tokens = []int{}
	}
	if b.ReturnTokenStrs {
		resp.TokenStrs = make([]string, len(ids))
		for i, id := range ids {
			resp.TokenStrs[i], _ = tok.Token(id)
		}
	}
	writeJSON(w, http.StatusOK, resp)
}

// detokenize answers POST /detokenize: the text of ids, special tokens kept.
func (g *Gateway) detokenize(w http.ResponseWriter, r *http.Request) {
	var b detokenizeRequest
	if err := decodeBody(w, r, &b); err != nil {
		g.fail(w, err)
		return
	}
	if _, err := g.gen.Model(b.Model); err != nil {
		g.fail(w, err)
		return
	}
	tok, err := g.gen.Tokenizer()
	if err != nil {
		g.fail(w, err)
		return
	}
	text, err := tok.DecodeSpecial(ints(b.Tokens))
	if err != nil {
		g.fail(w, fmt.Errorf("%w: tokens: %w", ErrInvalidRequest, err))
		return
	}
	writeJSON(w, http.StatusOK, DetokenizeResponse{Prompt: text})
}
