"""Scale-out: the stateless OpenAI and A1111 endpoints over many engine replicas on Ray Serve
(``sd3fp8 serve --ray``; ``pip install 'sd3fp8[scale]'``). See ``ray_serve``."""
