# The offline demo pool: openclipart images with captions from their SVG metadata.
# Local rules: they fetch Debian packages and scan folders, no cluster job needed.

DEMO = config["demo"]
# What demo_fetch writes once the Debian packages are unpacked under demo.resources_dir.
DEMO_SOURCES = os.path.join(DEMO["resources_dir"], "demo_sources.json")


localrules:
    demo_fetch,
    demo_pool,


rule demo_fetch:
    output:
        DEMO_SOURCES,
    log:
        out("logs/demo_fetch.log"),
    conda:
        "../envs/data.yaml"
    params:
        resources_dir=output_folder(0),
        system_root=DEMO["system_root"],
    shell:
        "python -m unicom.demo.build fetch --resources-dir {params.resources_dir:q}"
        " --system-root {params.system_root:q} --out {output:q} 2> {log:q}"


rule demo_pool:
    input:
        source=[] if DEMO["image_dir"] else DEMO_SOURCES,
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
        source=demo_pool_source,
        max_images=["--max-images", DEMO["max_images"]] if DEMO["max_images"] else [],
        heldout_fraction=DEMO["heldout_fraction"],
        seed=DEMO["seed"],
    shell:
        "python -m unicom.demo.build pool {params.source:q} {params.max_images:q}"
        " --heldout-fraction {params.heldout_fraction:q} --seed {params.seed:q}"
        " --out-urls {output.urls:q} --out-heldout {output.heldout:q}"
        " --out-dropped {output.dropped:q} --out-summary {output.summary:q} 2> {log:q}"
