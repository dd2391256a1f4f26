"""Feature extraction, one module per family (wsi, nuclei, morphology, topology, us, radiomics,
text, clinical) plus the encoder registries. Results are cached in the store by
(patient, family, extractor name + version, input hash)."""
