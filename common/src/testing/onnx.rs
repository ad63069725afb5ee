//! Test support: writing small ONNX models from Rust (the subset of `onnx.proto` a graph of
//! standard operators needs, as prost messages) and a whole tiny Stable-Diffusion-style export
//! folder whose graphs have the input/output names, element types and ranks of real SD 1.x exports
//! but trivial arithmetic, so pipeline tests run the real ONNX Runtime in milliseconds.

use std::io;
use std::path::Path;

use prost::Message;

// Field numbers are those of onnx/onnx.proto; only the fields these tests write are declared.

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    /// AttributeProto.AttributeType: FLOAT = 1, INT = 2, FLOATS = 6, INTS = 7.
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TypeProtoTensor>,
}

/// `TypeProto.Tensor`.
#[derive(Clone, PartialEq, Message)]
pub struct TypeProtoTensor {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// `TensorShapeProto.Dimension`: a fixed size or a symbolic name.
#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

/// `TensorProto.DataType` values used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32 = 1,
    I32 = 6,
    I64 = 7,
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Named(String),
}

pub fn named(name: &str) -> Dim {
    Dim::Named(name.to_owned())
}

/// A node attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// Builds one graph node by node; [`GraphBuilder::model_bytes`] gives the serialized ModelProto.
#[derive(Debug, Default, Clone)]
pub struct GraphBuilder {
    graph: GraphProto,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        Self { graph: GraphProto { name: name.to_owned(), ..Default::default() } }
    }

    pub fn input(&mut self, name: &str, elem: Elem, dims: &[Dim]) -> &mut Self {
        self.graph.input.push(value_info(name, elem, dims));
        self
    }

    pub fn output(&mut self, name: &str, elem: Elem, dims: &[Dim]) -> &mut Self {
        self.graph.output.push(value_info(name, elem, dims));
        self
    }

    pub fn init_f32(&mut self, name: &str, dims: &[i64], data: Vec<f32>) -> &mut Self {
        assert_eq!(dims.iter().product::<i64>() as usize, data.len(), "initializer {name}: dims and data disagree");
        self.graph.initializer.push(TensorProto {
            dims: dims.to_vec(),
            data_type: Elem::F32 as i32,
            float_data: data,
            name: name.to_owned(),
            ..Default::default()
        });
        self
    }

    pub fn init_i64(&mut self, name: &str, dims: &[i64], data: Vec<i64>) -> &mut Self {
        assert_eq!(dims.iter().product::<i64>() as usize, data.len(), "initializer {name}: dims and data disagree");
        self.graph.initializer.push(TensorProto {
            dims: dims.to_vec(),
            data_type: Elem::I64 as i32,
            int64_data: data,
            name: name.to_owned(),
            ..Default::default()
        });
        self
    }

    pub fn node(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: &[(&str, Attr)]) -> &mut Self {
        let attribute = attrs
            .iter()
            .map(|(name, a)| {
                let mut p = AttributeProto { name: (*name).to_owned(), ..Default::default() };
                match a {
                    Attr::Float(f) => (p.f, p.r#type) = (*f, 1),
                    Attr::Int(i) => (p.i, p.r#type) = (*i, 2),
                    Attr::Ints(v) => (p.ints, p.r#type) = (v.clone(), 7),
                }
                p
            })
            .collect();
        let index = self.graph.node.len();
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: outputs.iter().map(|s| (*s).to_owned()).collect(),
            name: format!("{op}_{index}"),
            op_type: op.to_owned(),
            attribute,
        });
        self
    }

    /// The serialized ModelProto of this graph against the default domain at `opset`.
    pub fn model_bytes(&self, opset: i64) -> Vec<u8> {
        ModelProto {
            ir_version: 8,
            producer_name: "kiln-testing".into(),
            graph: Some(self.graph.clone()),
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
        }
        .encode_to_vec()
    }
}

fn value_info(name: &str, elem: Elem, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => Dimension { dim_value: Some(*v), dim_param: None },
            Dim::Named(p) => Dimension { dim_value: None, dim_param: Some(p.clone()) },
        })
        .collect();
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor { elem_type: elem as i32, shape: Some(TensorShapeProto { dim }) }),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny Stable Diffusion export.

/// Element type and shape of the UNet's `timestep` input: real exports differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepInput {
    /// float32 `[1]` (what diffusers' own export traces).
    F32One,
    /// int64 `[batch]`.
    I64Batch,
    /// float32 scalar `[]`.
    F32Scalar,
}

/// What [`write_tiny_stable_diffusion`] writes. The UNet computes
/// `out_sample = a·sample + b·mean(encoder_hidden_states over tokens and features) + c·float(timestep)`;
/// the text encoder looks token ids up in [`tiny_embedding`]; the VAE decoder is a stride-8
/// transposed convolution, `sample[c, y, x] = Σₖ vae_weight(k, c, y % 8, x % 8)·latent[k, y/8, x/8] + vae_bias[c]`.
#[derive(Debug, Clone)]
pub struct TinySdOptions {
    /// Width of the text encoder's hidden states.
    pub hidden: usize,
    /// `input_ids` as int64 (optimum's export) instead of int32 (diffusers' export).
    pub input_ids_int64: bool,
    /// A static sequence length for `input_ids`; `None` leaves it symbolic as real exports do.
    pub text_seq_len: Option<i64>,
    pub timestep: TimestepInput,
    /// A static batch size for the UNet; `None` leaves it symbolic as real exports do.
    pub unet_batch: Option<i64>,
    /// `(a, b, c)` of the UNet.
    pub unet: (f32, f32, f32),
    /// `vae_mix[k][c]`: weight of latent channel `k` in image channel `c`.
    pub vae_mix: [[f32; 3]; 4],
    pub vae_bias: [f32; 3],
    /// Written to `vae_decoder/config.json`.
    pub scaling_factor: f32,
    /// `scheduler/scheduler_config.json`; `None` writes SD 1.x's (PNDM, leading spacing, offset 1).
    pub scheduler_config: Option<String>,
}

impl Default for TinySdOptions {
    fn default() -> Self {
        Self {
            hidden: 32,
            input_ids_int64: false,
            text_seq_len: None,
            timestep: TimestepInput::F32One,
            unet_batch: None,
            unet: (0.5, 2.0, 0.001),
            vae_mix: [[0.05, 0.02, -0.03], [-0.02, 0.04, 0.01], [0.03, -0.01, 0.05], [0.01, 0.03, -0.02]],
            vae_bias: [0.1, -0.1, 0.0],
            scaling_factor: 0.18215,
            scheduler_config: None,
        }
    }
}

impl TinySdOptions {
    /// The VAE decoder's transposed-convolution weight: latent channel `k` → image channel `c` at
    /// offset `(i, j)` inside each 8×8 block.
    pub fn vae_weight(&self, k: usize, c: usize, i: usize, j: usize) -> f32 {
        self.vae_mix[k][c] * (1.0 + (i * 8 + j) as f32 / 64.0)
    }
}

pub const SD_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;

/// Words the tiny vocabulary merges into one token each (plus every single byte, as CLIP has).
const TINY_WORDS: [&str; 3] = ["cat", "dog", "photo"];

/// The tiny CLIP vocabulary in CLIP's order: 256 byte symbols, the same with `</w>`, the merge
/// results, then `<|startoftext|>` and `<|endoftext|>`. Returns (vocab, merges).
pub fn tiny_clip_vocab() -> (Vec<String>, Vec<(String, String)>) {
    let symbols = byte_symbols();
    let mut vocab: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
    vocab.extend(symbols.iter().map(|c| format!("{c}</w>")));
    let mut merges = Vec::new();
    for word in TINY_WORDS {
        // Left to right: "c a" → "ca", "ca t</w>" → "cat</w>".
        let chars: Vec<String> = word.chars().map(String::from).collect();
        let mut left = chars[0].clone();
        for (n, ch) in chars.iter().enumerate().skip(1) {
            let right = if n + 1 == chars.len() { format!("{ch}</w>") } else { ch.clone() };
            let joined = format!("{left}{right}");
            merges.push((left.clone(), right));
            vocab.push(joined.clone());
            left = joined;
        }
    }
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    (vocab, merges)
}

/// The id of `token` in [`tiny_clip_vocab`].
pub fn tiny_token_id(token: &str) -> Option<u32> {
    tiny_clip_vocab().0.iter().position(|t| t == token).map(|p| p as u32)
}

/// Row `id`, column `h` of the tiny text encoder's embedding table.
pub fn tiny_embedding(id: usize, h: usize) -> f32 {
    ((id * 37 + h * 11) % 101) as f32 / 101.0 - 0.5
}

/// GPT-2/CLIP's reversible map from bytes to printable characters, in vocabulary order.
fn byte_symbols() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    chars.into_iter().map(|c| char::from_u32(c).expect("below the surrogate range")).collect()
}

/// Writes a whole diffusers-layout ONNX export of a tiny "Stable Diffusion" into `dir`.
pub fn write_tiny_stable_diffusion(dir: &Path, opts: &TinySdOptions) -> io::Result<()> {
    for sub in ["text_encoder", "unet", "vae_decoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::write(
        dir.join("model_index.json"),
        r#"{"_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": "0.6.0"}"#,
    )?;
    let (vocab, merges) = tiny_clip_vocab();
    let vocab_json: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::Value::from(i))).collect();
    std::fs::write(dir.join("tokenizer/vocab.json"), serde_json::to_vec(&vocab_json).map_err(io::Error::other)?)?;
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(&format!("{a} {b}\n"));
    }
    std::fs::write(dir.join("tokenizer/merges.txt"), merges_txt)?;
    std::fs::write(
        dir.join("scheduler/scheduler_config.json"),
        opts.scheduler_config.as_deref().unwrap_or(SD_SCHEDULER_CONFIG),
    )?;
    std::fs::write(
        dir.join("vae_decoder/config.json"),
        format!(
            r#"{{"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "scaling_factor": {}}}"#,
            opts.scaling_factor
        ),
    )?;
    std::fs::write(dir.join("text_encoder/model.onnx"), text_encoder(opts, vocab.len()))?;
    std::fs::write(dir.join("unet/model.onnx"), unet(opts))?;
    std::fs::write(dir.join("vae_decoder/model.onnx"), vae_decoder(opts))?;
    Ok(())
}

const OPSET: i64 = 17;

fn text_encoder(opts: &TinySdOptions, vocab: usize) -> Vec<u8> {
    let h = opts.hidden;
    let seq = opts.text_seq_len.map(Dim::Fixed).unwrap_or_else(|| named("sequence"));
    let ids = if opts.input_ids_int64 { Elem::I64 } else { Elem::I32 };
    let table = (0..vocab).flat_map(|v| (0..h).map(move |c| tiny_embedding(v, c))).collect();
    let mut g = GraphBuilder::new("text_encoder");
    g.input("input_ids", ids, &[named("batch"), seq.clone()])
        .init_f32("embeddings", &[vocab as i64, h as i64], table)
        .node("Gather", &["embeddings", "input_ids"], &["last_hidden_state"], &[("axis", Attr::Int(0))])
        .node(
            "ReduceMean",
            &["last_hidden_state"],
            &["pooler_output"],
            &[("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))],
        )
        // Listed first on purpose: a pipeline must pick `last_hidden_state` by name.
        .output("pooler_output", Elem::F32, &[named("batch"), Dim::Fixed(h as i64)])
        .output("last_hidden_state", Elem::F32, &[named("batch"), seq, Dim::Fixed(h as i64)]);
    g.model_bytes(OPSET)
}

fn unet(opts: &TinySdOptions) -> Vec<u8> {
    let (a, b, c) = opts.unet;
    let batch = opts.unet_batch.map(Dim::Fixed).unwrap_or_else(|| named("batch"));
    let latent = [batch.clone(), named("channels"), named("height"), named("width")];
    let (t_elem, t_dims) = match opts.timestep {
        TimestepInput::F32One => (Elem::F32, vec![Dim::Fixed(1)]),
        TimestepInput::I64Batch => (Elem::I64, vec![batch.clone()]),
        TimestepInput::F32Scalar => (Elem::F32, vec![]),
    };
    let mut g = GraphBuilder::new("unet");
    g.input("sample", Elem::F32, &latent)
        .input("timestep", t_elem, &t_dims)
        .input("encoder_hidden_states", Elem::F32, &[batch.clone(), named("sequence"), Dim::Fixed(opts.hidden as i64)])
        .init_f32("a", &[1], vec![a])
        .init_f32("b", &[1], vec![b])
        .init_f32("c", &[1], vec![c])
        .init_i64("axis3", &[1], vec![3])
        .init_i64("t_shape", &[4], vec![-1, 1, 1, 1])
        .node(
            "ReduceMean",
            &["encoder_hidden_states"],
            &["m3"],
            &[("axes", Attr::Ints(vec![1, 2])), ("keepdims", Attr::Int(1))],
        )
        .node("Unsqueeze", &["m3", "axis3"], &["m4"], &[])
        .node("Cast", &["timestep"], &["t_f"], &[("to", Attr::Int(Elem::F32 as i64))])
        .node("Reshape", &["t_f", "t_shape"], &["t4"], &[])
        .node("Mul", &["sample", "a"], &["ax"], &[])
        .node("Mul", &["m4", "b"], &["bm"], &[])
        .node("Mul", &["t4", "c"], &["ct"], &[])
        .node("Add", &["ax", "bm"], &["s1"], &[])
        .node("Add", &["s1", "ct"], &["out_sample"], &[])
        .output("out_sample", Elem::F32, &latent);
    g.model_bytes(OPSET)
}

fn vae_decoder(opts: &TinySdOptions) -> Vec<u8> {
    let mut weight = Vec::with_capacity(4 * 3 * 64);
    for k in 0..4 {
        for c in 0..3 {
            for i in 0..8 {
                for j in 0..8 {
                    weight.push(opts.vae_weight(k, c, i, j));
                }
            }
        }
    }
    let mut g = GraphBuilder::new("vae_decoder");
    g.input("latent_sample", Elem::F32, &[named("batch"), named("channels"), named("height"), named("width")])
        .init_f32("w", &[4, 3, 8, 8], weight)
        .init_f32("bias", &[3], opts.vae_bias.to_vec())
        .node(
            "ConvTranspose",
            &["latent_sample", "w", "bias"],
            &["sample"],
            &[("kernel_shape", Attr::Ints(vec![8, 8])), ("strides", Attr::Ints(vec![8, 8]))],
        )
        .output("sample", Elem::F32, &[named("batch"), Dim::Fixed(3), named("image_height"), named("image_width")]);
    g.model_bytes(OPSET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_numbers_match_onnx_proto() {
        // Hand-encoded: key = field << 3 | wire type.
        let m = ModelProto { ir_version: 8, ..Default::default() };
        assert_eq!(m.encode_to_vec(), [0x08, 8]);
        let g = GraphProto { name: "g".into(), ..Default::default() };
        assert_eq!(g.encode_to_vec(), [0x12, 1, b'g']);
        let mut b = GraphBuilder::new("");
        b.input("x", Elem::I64, &[Dim::Fixed(2)]);
        // GraphProto.input = 11 (0x5a); ValueInfoProto.type = 2; TypeProto.tensor_type = 1;
        // Tensor.elem_type = 1 (INT64 = 7), Tensor.shape = 2; Dimension.dim_value = 1.
        assert_eq!(b.graph.encode_to_vec(), expected_input_bytes());
        let t = TensorProto { name: "w".into(), data_type: 1, ..Default::default() };
        assert_eq!(t.encode_to_vec(), [0x10, 1, 0x42, 1, b'w']);
        let n = NodeProto { op_type: "Add".into(), ..Default::default() };
        assert_eq!(n.encode_to_vec(), [0x22, 3, b'A', b'd', b'd']);
        let o = OperatorSetIdProto { domain: String::new(), version: 17 };
        assert_eq!(ModelProto { opset_import: vec![o], ..Default::default() }.encode_to_vec(), [0x42, 2, 0x10, 17]);
    }

    fn expected_input_bytes() -> Vec<u8> {
        // Dimension { dim_value: 2 } = [0x08, 2]
        let dim = [0x08, 2];
        let shape = [&[0x0a, dim.len() as u8][..], &dim].concat();
        let tensor = [&[0x08, 7, 0x12, shape.len() as u8][..], &shape].concat();
        let ty = [&[0x0a, tensor.len() as u8][..], &tensor].concat();
        let vi = [&[0x0a, 1, b'x', 0x12, ty.len() as u8][..], &ty].concat();
        [&[0x5a, vi.len() as u8][..], &vi].concat()
    }

    #[test]
    fn tiny_vocab_has_clip_layout() {
        let (vocab, merges) = tiny_clip_vocab();
        assert_eq!(vocab[0], "!");
        assert_eq!(vocab[256], "!</w>");
        // Byte 0x20 (space) maps to U+0120 'Ġ' in the byte-level alphabet.
        assert!(vocab[..256].contains(&"Ġ".to_string()));
        assert_eq!(vocab.last().map(String::as_str), Some("<|endoftext|>"));
        assert_eq!(merges[0], ("c".to_string(), "a".to_string()));
        assert_eq!(merges[1], ("ca".to_string(), "t</w>".to_string()));
        assert_eq!(tiny_token_id("cat</w>"), Some(513));
        let unique: std::collections::HashSet<&String> = vocab.iter().collect();
        assert_eq!(unique.len(), vocab.len());
    }
}
