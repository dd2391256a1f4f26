"""Feature extraction, a module per family or step (wsi, nuclei, morphology, topology, us_image,
us_roi, us_encoder, radiomics, text, clinical) plus the encoder registries. Results are cached in
the store by (patient, family, extractor name + version, input hash)."""
