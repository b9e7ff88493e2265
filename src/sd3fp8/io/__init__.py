"""Files: safe safetensors reading, layout detection, key layouts, loading components, quantize/convert, atomic writes."""
