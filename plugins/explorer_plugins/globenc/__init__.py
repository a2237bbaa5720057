"""GlobEnc (Modarressi et al., NAACL 2022), adapted to pre-LN vision transformers."""
