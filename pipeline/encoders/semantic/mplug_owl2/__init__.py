"""mPLUG-Owl2 (MAGAer13/mplug-owl2-llama2-7b) as a native PyTorch module, for MA-AGIQA's semantic features.

`checkpoint.load_model` reads the original checkpoint, `processing` builds the inputs,
`extract.SemanticExtractor` pools the hidden states, `zeroshot` scores Q-Align quality and VQAScore
alignment from the next-token distribution, `tiny` makes a random miniature for demos and tests.
"""
