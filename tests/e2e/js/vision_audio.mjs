// The unmodified JS client (@huggingface/inference) against the vision and audio models at $BASE.
// Reads the test image (PNG) and audio (WAV) from $IMAGE and $AUDIO; prints what each task returned as JSON.
import { readFileSync } from "node:fs";
import { InferenceClient } from "@huggingface/inference";

const B = process.env.BASE;
const png = readFileSync(process.env.IMAGE);
const wav = readFileSync(process.env.AUDIO);
const image = () => new Blob([png], { type: "image/png" });
const audio = () => new Blob([wav], { type: "audio/wav" });
const client = (model) => new InferenceClient("hf_x", { endpointUrl: `${B}/models/${model}` });
const blobInfo = async (b) => ({ type: b.type, size: b.size, head: Buffer.from(await b.slice(0, 4).arrayBuffer()).toString("latin1") });

const out = {};
const tasks = {
  imageClassification: () => client("local/tiny-vit").imageClassification({ data: image() }),
  imageClassificationUntyped: () => client("local/tiny-vit").imageClassification({ data: new Blob([png]) }),
  objectDetection: () => client("local/tiny-yolos").objectDetection({ data: image() }),
  imageSegmentation: () => client("local/tiny-segformer").imageSegmentation({ inputs: image() }),
  imageToText: () => client("local/tiny-captioner").imageToText({ data: image() }),
  zeroShotImageClassification: () =>
    client("local/tiny-clip").zeroShotImageClassification({ inputs: { image: image() }, parameters: { candidate_labels: ["cat", "dog"] } }),
  visualQuestionAnswering: () =>
    client("local/tiny-vilt").visualQuestionAnswering({ inputs: { image: image(), question: "What is it?" }, parameters: { top_k: 2 } }),
  documentQuestionAnswering: () =>
    client("local/tiny-layoutlm-qa").documentQuestionAnswering({
      inputs: { image: image(), question: "What is it?" },
      parameters: { word_boxes: [["cat", [0, 0, 10, 10]], ["dog", [10, 10, 20, 20]]] },
    }),
  imageToImage: async () => blobInfo(await client("local/tiny-flux-img2img").imageToImage({ inputs: image() })),
  imageToImagePrompt: async () =>
    blobInfo(await client("local/tiny-flux-img2img").imageToImage({ inputs: image(), parameters: { prompt: "a cat", seed: 1 } })),
  automaticSpeechRecognition: () => client("local/tiny-wav2vec2-asr").automaticSpeechRecognition({ data: audio() }),
  audioClassification: () => client("local/tiny-wav2vec2-audio-classifier").audioClassification({ data: audio() }),
  audioToAudio: () => client("local/tiny-speecht5-vc").audioToAudio({ data: audio() }),
  textToSpeech: async () => blobInfo(await client("local/tiny-vits").textToSpeech({ inputs: "hello there" })),
  textToAudio: async () => blobInfo(await client("local/tiny-vits-audio").textToAudio({ inputs: "a dog barking" })),
  corruptImage: () => client("local/tiny-vit").imageClassification({ data: new Blob([Buffer.from("not an image")], { type: "image/png" }) }),
  wrongType: () => client("local/tiny-vit").imageClassification({ data: new Blob([wav], { type: "audio/wav" }) }),
};
for (const [name, run] of Object.entries(tasks)) {
  try {
    out[name] = { ok: await run() };
  } catch (e) {
    out[name] = { error: `${e.name}: ${e.message}` };
  }
}
console.log(JSON.stringify(out));
