//! Input audio: WAV decoding to mono f32 and resampling.
