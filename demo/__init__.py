"""The end-to-end demo: a real engine process, a streamed run, an approval."""
