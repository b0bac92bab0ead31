// The unmodified JS client (@huggingface/inference) against the service at $BASE; prints what it got as JSON.
import { InferenceClient } from "@huggingface/inference";
const B = process.env.BASE;
const out = {};
const img = await new InferenceClient("hf_x", { endpointUrl: `${B}/models/local/tiny-flux` }).textToImage({ inputs: "a cat", parameters: { seed: 1 } });
out.image = { type: img.type, size: img.size };
const chat = await new InferenceClient("hf_x", { endpointUrl: `${B}/models/HuggingFaceTB/SmolLM2-135M-Instruct` }).chatCompletion({ messages: [{ role: "user", content: "Hi" }], max_tokens: 5 });
out.chat = chat.choices[0].message.content;
let s = "";
for await (const c of new InferenceClient("hf_x", { endpointUrl: `${B}/models/HuggingFaceTB/SmolLM2-135M-Instruct` }).chatCompletionStream({ messages: [{ role: "user", content: "Hi" }], max_tokens: 5 })) { s += c.choices[0]?.delta?.content ?? ""; }
out.chatStream = s;
const fe = await new InferenceClient("hf_x", { endpointUrl: `${B}/models/sentence-transformers/all-MiniLM-L6-v2` }).featureExtraction({ inputs: "hello" });
out.fe = fe.length;
const ss = await new InferenceClient("hf_x", { endpointUrl: `${B}/models/sentence-transformers/all-MiniLM-L6-v2` }).sentenceSimilarity({ inputs: { source_sentence: "a", sentences: ["a", "b"] } });
out.ss = ss;
const tc = await new InferenceClient("hf_x", { endpointUrl: `${B}/models/local/tiny-sentiment` }).textClassification({ inputs: "I love it" });
out.tc = tc;
const tg = await new InferenceClient("hf_x", { endpointUrl: `${B}/models/HuggingFaceTB/SmolLM2-135M-Instruct` }).textGeneration({ inputs: "The capital of France is", parameters: { max_new_tokens: 5 } });
out.tg = tg;
try { await new InferenceClient("hf_x", { endpointUrl: `${B}/models/local/tiny-flux` }).textToImage({ inputs: "a cat", parameters: { width: 65 } }); } catch (e) { out.err = e.message; }
console.log(JSON.stringify(out));
