//! Input images: sniffing, header probing and decoding (PNG, JPEG, WebP; EXIF orientation).
