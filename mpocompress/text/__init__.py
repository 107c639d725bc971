"""Language models and text: Hugging Face model folders (:mod:`.hf`), text calibration and
fine-tuning batches (:mod:`.data`), and perplexity (:mod:`.evaluate`).

``transformers`` is needed here only (the ``[hf]`` extra) and is imported lazily.
"""
