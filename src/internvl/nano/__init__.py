"""The built-in nano model's recipe (a wing above training): config and tokenizer, curriculum, encoder
pretraining, model folders and shipping. `internvl nano VERB`; runs/train_nano.sh runs it end to end."""
