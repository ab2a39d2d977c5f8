package tokenizer

import "unicode/utf8"

// byteToRune is GPT-2's byte-level alphabet (bytes_to_unicode): bytes that are printable Latin-1 stand
// for themselves; the other 68 (controls, space, 0x7F–0xA0, 0xAD) map to U+0100 onwards in byte order,
// so a space is 'Ġ' (U+0120) and a newline 'Ċ' (U+010A).
var byteToRune [256]rune

// runeToByte inverts byteToRune.
var runeToByte = map[rune]byte{}

func init() {
	n := 0
	for b := range 256 {
		switch {
		case b >= '!' && b <= '~', b >= 0xA1 && b <= 0xAC, b >= 0xAE && b <= 0xFF:
			byteToRune[b] = rune(b)
		default:
			byteToRune[b] = rune(256 + n)
			n++
		}
		runeToByte[byteToRune[b]] = byte(b)
	}
}

// tokenBytes is what HF's ByteLevel decoder makes of one token: the bytes its characters stand for, or,
// when any character is outside the byte-level alphabet (an added token such as "<|eot|> " with a
// space), the token's own UTF-8. The second result says whether the token was fully byte-level.
func tokenBytes(tok string) ([]byte, bool) {
	out := make([]byte, 0, len(tok))
	for _, r := range tok {
		b, ok := runeToByte[r]
		if !ok {
			return []byte(tok), false
		}
		out = append(out, b)
	}
	return out, true
}

// appendLossy appends b to dst as UTF-8, replacing each maximal invalid subsequence with one U+FFFD,
// as Rust's String::from_utf8_lossy (and so HF's ByteLevel decoder) does. When final is false, an
// incomplete but so far valid sequence at the end of b is left unconsumed. It returns dst and the
// number of bytes of b consumed.
func appendLossy(dst, b []byte, final bool) ([]byte, int) {
	i := 0
	for i < len(b) {
		c := b[i]
		if c < utf8.RuneSelf {
			dst = append(dst, c)
			i++
			continue
		}
		need, lo, hi := seqInfo(c)
		if need == 0 {
			dst = utf8.AppendRune(dst, utf8.RuneError)
			i++
			continue
		}
		j := 1 // bytes of the sequence accepted so far
		for ; j <= need; j++ {
			if i+j == len(b) {
				if !final {
					return dst, i
				}
				break
			}
			l, h := byte(0x80), byte(0xBF)
			if j == 1 {
				l, h = lo, hi
			}
			if x := b[i+j]; x < l || x > h {
				break
			}
		}
		if j > need {
			dst = append(dst, b[i:i+j]...)
		} else {
			dst = utf8.AppendRune(dst, utf8.RuneError)
		}
		i += j
	}
	return dst, i
}

// seqInfo gives, for a non-ASCII byte, how many continuation bytes its sequence needs and the range the
// first of them must lie in (Unicode table 3-7); need is 0 for a byte that cannot start a sequence.
func seqInfo(c byte) (need int, lo, hi byte) {
	switch {
	case c >= 0xC2 && c <= 0xDF:
		return 1, 0x80, 0xBF
	case c == 0xE0:
		return 2, 0xA0, 0xBF
	case c == 0xED:
		return 2, 0x80, 0x9F
	case c >= 0xE1 && c <= 0xEF:
		return 2, 0x80, 0xBF
	case c == 0xF0:
		return 3, 0x90, 0xBF
	case c >= 0xF1 && c <= 0xF3:
		return 3, 0x80, 0xBF
	case c == 0xF4:
		return 3, 0x80, 0x8F
	}
	return 0, 0, 0
}
