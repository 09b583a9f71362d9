# The offline demo pool: openclipart images with captions from their SVG metadata.
# Local rules: they fetch Debian packages and scan folders, no cluster job needed.

DEMO = config["demo"]


localrules:
    demo_fetch,
    demo_pool,


rule demo_fetch:
    output:
        os.path.join(DEMO["resources_dir"], "demo_sources.json"),
    log:
        out("logs/demo_fetch.log"),
    conda:
        "../envs/data.yaml"
    params:
        resources_dir=lambda wildcards, output: os.path.dirname(output[0]),
        system_root=DEMO["system_root"],
    shell:
        "python -m unicom.demo.build fetch --resources-dir {params.resources_dir:q}"
        " --system-root {params.system_root:q} --out {output:q} 2> {log:q}"


rule demo_pool:
    input:
        source=[] if DEMO["image_dir"] else rules.demo_fetch.output,
    output:
        urls=out("demo/urls.parquet"),
        heldout=out("demo/heldout.parquet"),
        dropped=out("demo/dropped.csv"),
        summary=out("demo/pool.json"),
    log:
        out("logs/demo_pool.log"),
    benchmark:
        out("benchmarks/demo_pool.tsv")
    conda:
        "../envs/data.yaml"
    params:
        source=lambda wildcards, input: (
            ["--image-dir", DEMO["image_dir"]]
            if DEMO["image_dir"]
            else ["--source", input.source]
        ),
        max_images=["--max-images", DEMO["max_images"]] if DEMO["max_images"] else [],
        heldout_fraction=DEMO["heldout_fraction"],
        seed=DEMO["seed"],
    shell:
        "python -m unicom.demo.build pool {params.source:q} {params.max_images:q}"
        " --heldout-fraction {params.heldout_fraction:q} --seed {params.seed:q}"
        " --out-urls {output.urls:q} --out-heldout {output.heldout:q}"
        " --out-dropped {output.dropped:q} --out-summary {output.summary:q} 2> {log:q}"
