package security

import (
	"crypto/sha256"
	"crypto/subtle"
	"strings"
)

// Tokens is a set of bearer tokens, compared in constant time. The zero Tokens holds none. Its
// methods are safe for concurrent use; it is not changed after NewTokens.
type Tokens struct {
	sums [][sha256.Size]byte
}

// NewTokens returns the set of the non-empty keys.
func NewTokens(keys ...string) Tokens {
	var t Tokens
	for _, k := range keys {
		if k != "" {
			t.sums = append(t.sums, sha256.Sum256([]byte(k)))
		}
	}
	return t
}

// Len is the number of tokens.
func (t Tokens) Len() int { return len(t.sums) }

// Valid reports whether token is one of the set. Every token is compared, each in constant time (of
// their hashes, so the length does not show either).
func (t Tokens) Valid(token string) bool {
	sum := sha256.Sum256([]byte(token))
	ok := 0
	for _, s := range t.sums {
		ok |= subtle.ConstantTimeCompare(sum[:], s[:])
	}
	return ok == 1 && token != ""
}

// BearerToken returns the token of an "Authorization: Bearer TOKEN" value, or "".
func BearerToken(authorization string) string {
	const prefix = "bearer "
	if len(authorization) < len(prefix) || !strings.EqualFold(authorization[:len(prefix)], prefix) {
		return ""
	}
	return strings.TrimSpace(authorization[len(prefix):])
}
