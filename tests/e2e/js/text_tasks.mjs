// The unmodified JS client (@huggingface/inference) against the text and tabular models at $BASE (the all-tasks
// catalog's pool); prints what each task returned (or its error message) as JSON.
import { InferenceClient } from "@huggingface/inference";

const B = process.env.BASE;
const client = (model) => new InferenceClient("hf_x", { endpointUrl: `${B}/models/${model}` });
const table = { Repository: ["Transformers", "Datasets", "Tokenizers"], Stars: ["36542", "4512", "3934"] };
const wine = {
  fixed_acidity: ["7.4", "7.8", "10.3"],
  volatile_acidity: ["0.7", "0.88", "0.32"],
  citric_acid: ["0", "0", "0.45"],
  residual_sugar: ["1.9", "2.6", "6.4"],
  alcohol: ["9.4", "9.8", "12.8"],
};
const fish = { Species: ["Bream", "Pike"], Length1: ["23.2", "30"], Length2: ["25.4", "32.4"], Height: ["11.52", "8.1"], Width: ["4.02", "5.3"] };

const tasks = {
  questionAnswering: () =>
    client("local/tiny-qa").questionAnswering({ inputs: { question: "What is the capital of France?", context: "Paris is the capital of France." } }),
  fillMask: () => client("local/tiny-fill-mask").fillMask({ inputs: "The cat sat on the [MASK]." }),
  tokenClassification: () => client("local/tiny-ner").tokenClassification({ inputs: "My name is Sarah and I live in London" }),
  zeroShotClassification: () =>
    client("local/tiny-nli").zeroShotClassification({ inputs: "I love this movie", parameters: { candidate_labels: ["positive", "negative"] } }),
  summarization: () => client("local/tiny-summarizer").summarization({ inputs: "the cat sat on the mat ".repeat(10), parameters: { generate_parameters: { max_new_tokens: 6 } } }),
  translation: () => client("local/tiny-translator").translation({ inputs: "le chat est sur le tapis", parameters: { src_lang: "fr", tgt_lang: "en" } }),
  tableQuestionAnswering: () => client("local/tiny-tapas").tableQuestionAnswering({ inputs: { query: "How many stars does Datasets have?", table } }),
  tabularClassification: () => client("local/tiny-wine-quality").tabularClassification({ inputs: { data: wine } }),
  tabularRegression: () => client("local/tiny-fish-weight").tabularRegression({ inputs: { data: fish } }),
  badFillMask: () => client("local/tiny-fill-mask").fillMask({ inputs: "no mask" }),
  badTable: () => client("local/tiny-fish-weight").tabularRegression({ inputs: { data: {} } }),
};

const out = {};
for (const [name, run] of Object.entries(tasks)) {
  try {
    out[name] = { ok: await run() };
  } catch (e) {
    out[name] = { error: e.message };
  }
}
console.log(JSON.stringify(out));
