package tinybpe

// Corpus is the training text: English prose with contractions and capitals, a little code, numbers,
// whitespace runs and a few words of other scripts.
const Corpus = `Hello world! Hello there, world. The world is wide and the sea is deep.
I'm here and you're there; we'll meet where they've been. It's late, isn't it? I'd say so.
I'M HERE. YOU'RE THERE. WE'LL SEE. DON'T STOP. She said "hello" and he said "goodbye".
The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun all day long.
A tokenizer splits text into pieces, and the pieces into tokens; the tokens are numbers.
Numbers like 123, 4567 and 2024 are split into groups of up to three digits: 123 456 789.
In the beginning there was the text, and the text was long, and then there was the model.
The model reads the tokens and writes the next token, one token at a time, until the end.
Every token has an id; every id has a token. When the model is done it says the end token.
The server streams the text back to the user as soon as each piece of text is complete.

func main() {
	for i := 0; i < 10; i++ {
		fmt.Println("hello, world", i)
	}
}

def greet(name):
    return f"Hello, {name}!"

if x == 1 and y != 2: print(x + y)   # a comment
path/to/the/file.txt and http://example.com/index.html

Hello   world    with   spaces.
Tabs	and	newlines
are whitespace too.

你好，世界。我们的世界很大。
مرحبا بالعالم. العالم كبير.
Привет, мир! Мир большой.
Emoji: 👋 🌍 👨‍👩‍👧 ❤️ and café, naïve, résumé.
The end of the text is the end of the training, and the end of the training is the start of the test.
There is more text here so that the tokenizer learns the common words of the tests: the, and, there,
here, world, hello, model, token, text, server, user, system, assistant, helpful, answer, question.
You are a helpful assistant. Answer the question of the user. What is the capital of France?
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
`
