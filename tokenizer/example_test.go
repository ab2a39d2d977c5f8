package tokenizer_test

import (
	"fmt"
	"log"
	"strings"

	"github.com/tpfleet/tpfleet/tokenizer"
)

func Example() {
	tok, err := tokenizer.Load("testdata/tiny")
	if err != nil {
		log.Fatal(err)
	}
	ids := tok.Encode("Hello world", true)
	text, err := tok.Decode(ids, false)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ids, text)

	prompt, err := tok.ApplyChatTemplate([]tokenizer.Message{
		{Role: "system", Content: "You are a helpful assistant."},
		{Role: "user", Content: "Hi!"},
	}, true)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%q\n", prompt)

	// Stream ids back to text; the decoder only returns complete characters.
	d := tok.NewDecoder(true)
	var out strings.Builder
	for _, id := range tok.Encode("<|begin_of_text|>café 👋", false) {
		s, err := d.Add(id)
		if err != nil {
			log.Fatal(err)
		}
		out.WriteString(s)
	}
	out.WriteString(d.Flush())
	fmt.Println(out.String())
	// Output:
	// [490 310 296] <|begin_of_text|>Hello world
	// "<|begin_of_text|><|header_start|>system<|header_end|>\n\nYou are a helpful assistant.<|eot|><|header_start|>user<|header_end|>\n\nHi!<|eot|><|header_start|>assistant<|header_end|>\n\n"
	// café 👋
}
